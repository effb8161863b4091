"""A refusal leaves the disk as it found it, and the run directory's lock goes when a run ends.

Each refusal is made for real (a sweep refused for a missing extra, instruction data with a bad
line; the command's main() run in the test process, tests/commands.py) and the tree is listed before
and after. The run directory's lock: a requeued job takes over as soon as its previous attempt is
gone (its pid has ended though its lock is still held; a lost node's attempt of the same SLURM job),
while anything else is refused at once. And a full disk refuses appends too: metrics.jsonl (the
kernel's file-size limit, in a process of its own) and train.log (/dev/full) end the run with the
one-line message.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.runtime import rundir

from .commands import run_in_process
from .conftest import REPO, TINY_RUN
from .hellaswag_examples import write_jsonl

QUICK = [*TINY_RUN, "sample_tokens=0"]


def listing(folder: Path) -> list[str]:
    """Every path under folder (files and folders), relative to it: the tree before and after."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout
    return lines[0]


def test_a_refused_sweep_leaves_no_sweep_directory(tmp_path, corpus):
    (tmp_path / "notes.txt").write_text("mine\n")
    before = listing(tmp_path)
    refused = run_in_process("nanogpt.train", "-m", *QUICK, "logger=tensorboard", "dataset=text",
                             f"dataset.source={corpus}", f"data_root={tmp_path / 'data'}",
                             "optimizer.lr=1e-3,1e-4", cwd=tmp_path, hidden=["tensorboard"])
    line = one_error_line(refused)
    assert line.startswith("error: logger=tensorboard needs the optional package tensorboard"), line
    assert listing(tmp_path) == before  # no outputs/sweeps/<time>/multirun.yaml, not even outputs/


def test_failed_instruction_data_leaves_no_cache_folder_or_lock(tmp_path, bpe_cache):
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "earlier").mkdir()  # a cache folder that was there before stays as it was
    (data_root / "earlier" / "meta.json").write_text('{"format": 2}')
    bad = write_jsonl(tmp_path / "chats.jsonl", [{"prompt": "hello", "response": "hi"},
                                                 {"prompt": "no answer"}])
    before = listing(tmp_path)
    refused = run_in_process("nanogpt.data", "dataset=sft", f"dataset.source={bad}", "dataset.tokenizer=gpt2",
                             f"data_root={data_root}", cwd=tmp_path)
    assert one_error_line(refused) == (f"error: {bad}:2: a line needs \"prompt\" and \"response\", or "
                                       "\"messages\" (its keys: 'prompt')")
    assert listing(tmp_path) == before  # no sft-chats-<hash>/ and no .lock in it
    fresh = run_in_process("nanogpt.data", "dataset=sft", f"dataset.source={bad}", "dataset.tokenizer=gpt2",
                           f"data_root={tmp_path / 'new_root'}", cwd=tmp_path)
    one_error_line(fresh)
    assert listing(tmp_path) == before  # nor the data root it made for it


@pytest.fixture
def holder_gone_lock_kept(tmp_path):
    """A directory whose holder (the pid in .run.holder) has ended while its lock is still held.

    As a lock outlives its holder when a process that inherited its descriptor lives on, or when a
    network file system has not yet noticed a lost node: here another process holds the lock file
    with flock itself.
    """
    run_dir = tmp_path / "run"
    died = ("import os, sys; from nanogpt.runtime import rundir; rundir.claim(sys.argv[1]); "
            "os._exit(0)")  # ends without letting go, as a kill -9 would
    subprocess.run([sys.executable, "-c", died, str(run_dir)], env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, timeout=120)
    keeps = ("import fcntl, sys, time; lock = open(sys.argv[1], 'a'); fcntl.flock(lock, fcntl.LOCK_EX); "
             "print('locked', flush=True); time.sleep(300)")
    keeper = subprocess.Popen([sys.executable, "-c", keeps, str(run_dir / rundir.LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    assert keeper.stdout.readline().strip() == "locked"
    yield run_dir, json.loads((run_dir / rundir.HOLDER_FILE).read_text())
    keeper.kill()
    keeper.wait()


def test_a_requeued_job_takes_over_as_soon_as_its_previous_attempt_is_gone(holder_gone_lock_kept,
                                                                            monkeypatch):
    run_dir, holder = holder_gone_lock_kept
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(rundir.RunDirInUse, match=f"is in use by pid {holder['pid']} on"):
        rundir.claim(run_dir)  # not a requeued job: the lock is held, so the directory is refused
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    claim = rundir.claim(run_dir)  # requeued: its holder (this host, its pid ended) is gone: no wait
    try:
        assert claim.took_over["pid"] == holder["pid"]
        assert json.loads((run_dir / rundir.HOLDER_FILE).read_text())["pid"] == os.getpid()
    finally:
        claim.release()
    assert sorted(p.name for p in run_dir.iterdir()) == []  # let go: neither lock file nor holder file


def test_an_earlier_attempt_of_the_same_slurm_job_elsewhere_is_gone_another_job_is_not(holder_gone_lock_kept,
                                                                                        monkeypatch):
    run_dir, _ = holder_gone_lock_kept  # its lock still held (by the child): as a lost node's lease
    elsewhere = {"host": "node-that-was-lost", "pid": 4242, "since": "then", "job": "77", "attempt": 0}
    (run_dir / rundir.HOLDER_FILE).write_text(json.dumps(elsewhere))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job's run: refused at once, not waited for
    with pytest.raises(rundir.RunDirInUse, match="is in use by pid 4242 on node-that-was-lost"):
        rundir.claim(run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # this job's attempt 0: SLURM ended it before attempt 1
    claim = rundir.claim(run_dir)
    try:
        assert claim.took_over == elsewhere
    finally:
        claim.release()


@pytest.fixture
def trained(tmp_path, corpus):
    """A finished tiny run, and its train arguments (data prepared)."""
    args = [*QUICK, "dataset=text", f"dataset.source={corpus}", f"data_root={tmp_path / 'data'}"]
    done = run_in_process("nanogpt.train", *args, "max_iters=4", "eval_interval=2", "hydra.run.dir=run",
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "run", args


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_full_disk_refuses_appends_to_metrics_and_the_log_in_one_line(trained, tmp_path):
    run_dir, args = trained

    def limit() -> None:  # no file may grow past 8 kB: .hydra's files fit, metrics.jsonl soon does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    grown = subprocess.run([sys.executable, "-m", "nanogpt.train", *args, "max_iters=100000",
                            "log_interval=1", "eval_interval=100000", "save_checkpoints=false",
                            "hydra.run.dir=grown"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300, preexec_fn=limit)
    line = one_error_line(grown, status=1)
    metrics = tmp_path / "grown" / "metrics.jsonl"
    assert line.startswith(f"error: could not add to {metrics}: File too large ("), line
    assert line.endswith("free there); what it held before is kept. Free some space (or choose another "
                         "directory) and run again")

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this machine")
    full = tmp_path / "full"  # the run's log on a device that is always full
    shutil.copytree(run_dir, full)
    (full / "train.log").unlink()
    (full / "train.log").symlink_to("/dev/full")
    resumed = run_in_process("nanogpt.train", f"resume={full}", "max_iters=8", cwd=tmp_path)
    line = one_error_line(resumed, status=1)
    assert line.startswith(f"error: could not add to {full / 'train.log'}: No space left on device ("), line
    assert not list(full.glob(".run.*"))  # it let go of the directory on the way out
