"""No command deletes or overwrites what it did not make: each is tried against the user's files, and every
file's sha256 is checked after.

The real commands: export, train (a new run into a finished run's directory, into one a killed run
left, into a folder of the user's or another program's run; a resume of a damaged last.pt or of a
file that only has its name), bench, data, report and a sweep, each aimed at what it must not touch;
then export's own rule, that it replaces only an earlier export of its own, and that an export
stopped half-way (a real SIGTERM, a real SIGKILL, in real processes) leaves the earlier one whole. The
other commands run their main() in the test process (tests/commands.py): a process would spend most of
its life starting (tests/test_bad_input.py refuses through each entry point in a real process).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.fileio import WRITTEN_FILE
from nanogpt.runtime import rundir

from .commands import run_in_process
from .conftest import REPO, TINY_RUN, copy_of_trained_run

QUICK = [*TINY_RUN, "logger=none", "sample_tokens=0", "max_iters=4", "eval_interval=2"]


@pytest.fixture(scope="module")
def place(tmp_path_factory, trained_run) -> Path:
    """A folder holding a finished run ("run"), its prepared data ("data") and its corpus (the shared run)."""
    work, _, _ = trained_run
    root = tmp_path_factory.mktemp("user_files")
    copy_of_trained_run(trained_run, root)
    shutil.copytree(work / "data", root / "data")
    shutil.copy(work / "corpus.txt", root / "corpus.txt")
    assert not (root / "run" / rundir.LOCK_FILE).exists()  # a finished run lets go of its lock file too
    return root


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under folder: a file by the sha256 of its bytes, a folder as '/'."""
    return {str(p.relative_to(folder)): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def one_error_line(result: subprocess.CompletedProcess, what: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        f"{what}:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, what
    return lines[0]


def users_folder(path: Path) -> Path:
    """A folder of the user's, holding files of the names our commands write."""
    path.mkdir()
    for name in ("notes.txt", "config.yaml", "train.log", "summary.md", "loss_curve.png", "input.txt",
                 "bench.json", "model.safetensors"):
        (path / name).write_text(f"my own {name}\n")
    (path / "meta.json").write_text('{"mine": true}\n')
    return path


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_no_command_writes_over_the_users_files_or_another_run(place, tmp_path):
    run, data = place / "run", place / "data"
    exported_run = tmp_path / "exported_run"  # the run export aims at (a copy of it)
    shutil.copytree(run, exported_run)
    killed = tmp_path / "killed"  # a run killed with -9: its lock file and holder file left behind
    shutil.copytree(run, killed)
    (killed / rundir.LOCK_FILE).touch()
    (killed / rundir.HOLDER_FILE).write_text(json.dumps({"host": "gone", "pid": 1, "since": "then"}))
    mine = {name: users_folder(tmp_path / name) for name in
            ("for_export", "for_dot", "for_train", "for_bench", "for_data", "for_report", "for_sweep",
             "for_resume")}
    (mine["for_resume"] / "last.pt").write_text("my own last.pt\n")  # a file of that name, not a checkpoint
    theirs = tmp_path / "theirs"  # another Hydra program's run: its .hydra/ and files of our names
    shutil.copytree(run / ".hydra", theirs / ".hydra")
    for name in ("config.yaml", "train.log", "summary.json", "metrics.jsonl"):
        (theirs / name).write_text(f"their own {name}\n")
    damaged = tmp_path / "damaged"  # a run of ours whose last.pt was cut short
    shutil.copytree(run, damaged)
    os.truncate(damaged / "last.pt", (damaged / "last.pt").stat().st_size // 2)
    before = tree(tmp_path), tree(place)

    train = [*QUICK, "dataset=text", f"dataset.source={place / 'corpus.txt'}", f"data_root={data}"]
    attempts = {  # each aimed at a folder of its own, run in this process (tests/commands.py)
        "export": ("nanogpt.export", f"ckpt={run}", f"out={mine['for_export']}"),
        "export into its run": ("nanogpt.export", f"ckpt={run}", f"out={exported_run}"),
        "export into .": ("nanogpt.export", f"ckpt={run}", "out=."),
        "a new run into a finished run": ("nanogpt.train", *train, f"hydra.run.dir={run}"),
        "a new run into a killed run": ("nanogpt.train", *train, f"hydra.run.dir={killed}"),
        "train": ("nanogpt.train", *train, "auto_resume=true", f"hydra.run.dir={mine['for_train']}"),
        "train into another program's run": ("nanogpt.train", *train, f"hydra.run.dir={theirs}"),
        "auto_resume into another program's run": ("nanogpt.train", *train, "auto_resume=true",
                                                   f"hydra.run.dir={theirs}"),
        "auto_resume of a last.pt not ours": ("nanogpt.train", *train, "auto_resume=true",
                                              f"hydra.run.dir={mine['for_resume']}"),
        "resume= of a damaged last.pt": ("nanogpt.train", f"resume={damaged}", "max_iters=8"),
        "auto_resume of a damaged last.pt": ("nanogpt.train", *train, "max_iters=8", "auto_resume=true",
                                             f"hydra.run.dir={damaged}"),
        "bench": ("nanogpt.bench", "device=cpu", "model=tiny", f"hydra.run.dir={mine['for_bench']}"),
        "data": ("nanogpt.data", "dataset=text", f"dataset.source={place / 'corpus.txt'}",
                 "dataset.name=for_data", f"data_root={tmp_path}"),
        "report": ("nanogpt.report", str(run), str(killed), "--out", str(mine["for_report"])),
        "sweep": ("nanogpt.train", "-m", *train, "optimizer.lr=1e-3,1e-4",
                  f"hydra.sweep.dir={mine['for_sweep']}"),
    }
    results = {what: run_in_process(*command, cwd=mine["for_dot"] if what == "export into ." else tmp_path)
               for what, command in attempts.items()}
    lines = {what: one_error_line(result, what) for what, result in results.items()}

    assert (tree(tmp_path), tree(place)) == before  # not one byte changed, not one file or folder added
    assert lines["export"] == (
        f"error: out={mine['for_export']} already holds bench.json, config.yaml, input.txt, loss_curve.png, "
        "meta.json and 4 more, which nanogpt.export did not write; it writes into a new or empty directory, "
        "or over an earlier one of its own: give another out= (nothing was written)")
    assert lines["export into its run"].startswith(f"error: out={exported_run} already holds .hydra, "
                                                   ".nanogpt-run.json, best.pt")
    assert lines["export into ."].startswith("error: out=. is the directory you are in")
    for what, folder in (("a new run into a finished run", run), ("a new run into a killed run", killed)):
        line = lines[what]
        assert line.startswith(f"error: {folder.resolve()} already holds a run (.hydra"), line
        assert f"python -m nanogpt.train resume={folder.resolve()}" in line and "auto_resume=true" in line
        assert "give a fresh directory (hydra.run.dir=NEW" in line
    assert "which no nanogpt run wrote; train writes its log, config and results there" in lines["train"]
    assert "which no nanogpt run wrote; bench writes" in lines["bench"]
    for what in ("train into another program's run", "auto_resume into another program's run"):
        assert lines[what].startswith(f"error: {theirs} already holds .hydra, config.yaml, metrics.jsonl, "
                                      "summary.json, train.log, which no nanogpt run wrote"), lines[what]
    assert lines["auto_resume of a last.pt not ours"].startswith(
        f"error: checkpoint {mine['for_resume'] / 'last.pt'} is truncated, corrupted or not a torch.save")
    for what in ("resume= of a damaged last.pt", "auto_resume of a damaged last.pt"):
        assert lines[what].startswith(f"error: checkpoint {damaged / 'last.pt'} is truncated"), lines[what]
    assert lines["data"].startswith(f"error: {mine['for_data']} already holds bench.json, config.yaml")
    assert lines["data"].endswith("which no preparation wrote; prepared data gets a folder of its own: give "
                                  "another dataset.name (or data_root)")
    assert lines["report"].startswith(f"error: {mine['for_report']} already holds summary.md, which "
                                      "nanogpt.report did not write")
    assert lines["sweep"].startswith(f"error: the sweep directory {mine['for_sweep']} already holds")


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_export_replaces_only_its_own_export_and_a_stopped_one_leaves_it_whole(place, tmp_path):
    run, out = place / "run", tmp_path / "hf"
    first = run_in_process("nanogpt.export", f"ckpt={run}", f"out={out}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    written = json.loads((out / WRITTEN_FILE).read_text())
    assert written["by"] == "nanogpt.export" and "model.safetensors" in written["files"]
    exported = tree(out)

    # Stopped half-way through writing the weights: by SIGTERM (as Ctrl-C or a scheduler would), then
    # by SIGKILL. The weights are written into a folder beside out; out is never touched.
    stop_midway = (
        "import os, signal, sys; from transformers import GPT2LMHeadModel\n"
        "save, stop = GPT2LMHeadModel.save_pretrained, getattr(signal, sys.argv.pop(1))\n"
        "def half_then_stop(self, directory, **kwargs):\n"
        "    save(self, directory, **kwargs)\n"
        "    weights = os.path.join(directory, 'model.safetensors')\n"
        "    os.truncate(weights, os.path.getsize(weights) // 2)\n"
        "    os.kill(os.getpid(), stop)\n"
        "GPT2LMHeadModel.save_pretrained = half_then_stop\n"
        "from nanogpt.export import main; main()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for signal_name, status in (("SIGTERM", 143), ("SIGKILL", -9)):
        stopped = subprocess.run([sys.executable, "-c", stop_midway, signal_name, f"ckpt={run}",
                                  f"out={out}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=300)
        assert stopped.returncode == status, stopped.stderr
        assert tree(out) == exported  # the earlier export, whole
        if signal_name == "SIGTERM":
            last = stopped.stderr.strip().splitlines()[-1]
            assert last.startswith("stopped by SIGTERM: export did not finish"), stopped.stderr
            assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # its staging folder removed
    # kill -9 leaves its hidden staging folder beside out (nothing can run on the way out), and no more.
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"][0].startswith(".hf.")

    (out / "README.md").write_text("my notes on this export\n")  # out now holds a file of the user's
    refused = run_in_process("nanogpt.export", f"ckpt={run}", f"out={out}", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: out={out} already holds README.md, "
                                                                 "which nanogpt.export did not write")
    (out / "README.md").unlink()
    again = run_in_process("nanogpt.export", f"ckpt={run}", f"out={out}", cwd=tmp_path)  # its own: replaced
    assert again.returncode == 0, again.stderr
    files = {name: digest for name, digest in tree(out).items() if name != WRITTEN_FILE}
    assert files == {name: digest for name, digest in exported.items() if name != WRITTEN_FILE}


def test_exported_files_are_readable_like_their_neighbours_as_the_umask_allows(place, tmp_path):
    run = place / "run"
    for umask in (0o022, 0o027):
        out = tmp_path / f"hf-{umask:o}"
        previous = os.umask(umask)
        try:
            exported = run_in_process("nanogpt.export", f"ckpt={run}", f"out={out}", cwd=tmp_path)
            (tmp_path / f"beside-{umask:o}.txt").write_text("a plain open()\n")  # a neighbour's mode
        finally:
            os.umask(previous)
        assert exported.returncode == 0, exported.stderr
        neighbour = stat.S_IMODE((tmp_path / f"beside-{umask:o}.txt").stat().st_mode)
        assert neighbour == 0o666 & ~umask
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {neighbour}, modes
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # the folder as mkdir makes one
