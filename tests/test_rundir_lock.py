"""One writer per run directory, with real processes: refused while a run lives, taken over once it died."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanogpt.runtime import rundir

from .commands import run_in_process
from .conftest import REPO, TINY_RUN, run_module
from .test_stops import Running

QUICK = [*TINY_RUN, "logger=none", "sample_tokens=0", "eval_at_start=true"]
LONG = ["max_iters=1000000", "eval_interval=50"]  # runs until it is stopped


def common(corpus: Path, data_root: Path, run_dir: Path) -> list[str]:
    return [*QUICK, "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}",
            f"hydra.run.dir={run_dir}", "auto_resume=true"]


def wait_for_file(path: Path, job: Running, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert job.process.poll() is None and time.monotonic() < deadline, "\n".join(job.stdout + job.stderr)
        time.sleep(0.05)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """What a second process must not touch: Hydra's record of the run and the run's config."""
    files = [run_dir / "config.yaml", *sorted((run_dir / ".hydra").iterdir())]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files}


@pytest.mark.slow  # two training processes, one killed mid-run
def test_a_second_process_is_refused_and_a_killed_runs_directory_is_taken_over(corpus, data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = common(corpus, data_root, run_dir)
    first = Running([sys.executable, "-m", "nanogpt.train", *args, *LONG], tmp_path)
    wait_for_file(run_dir / "last.pt", first)  # training, and saved once (the evaluation at iteration 0)
    holder = json.loads((run_dir / rundir.HOLDER_FILE).read_text())
    assert (holder["pid"], holder["host"]) == (first.process.pid, socket.gethostname())
    before = snapshot(run_dir)

    again = run_module("nanogpt.train", *args, "max_iters=5", cwd=tmp_path)  # the same command, say requeued
    # resume= refused too: its main() run in this process (tests/commands.py), a process other than the holder
    resumed = run_in_process("nanogpt.train", f"resume={run_dir}", "max_iters=7", cwd=tmp_path)
    for second in (again, resumed):
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {run_dir} is in use by "), second.stderr
        assert f"pid {first.process.pid} on {socket.gethostname()}" in lines[0]
    assert snapshot(run_dir) == before  # Hydra's files untouched: refused before Hydra wrote
    assert first.process.poll() is None  # the first run goes on, undisturbed

    first.process.kill()  # SIGKILL, as the out-of-memory killer or a lost node: nothing runs on the way out
    first.process.wait()
    assert (run_dir / rundir.HOLDER_FILE).exists()  # its holder file stays; its lock died with it
    saved = torch.load(run_dir / "last.pt", weights_only=True)["iter_num"]

    takeover = run_module("nanogpt.train", *args, f"max_iters={saved + 10}", "eval_interval=10", cwd=tmp_path)
    assert takeover.returncode == 0, takeover.stderr
    output = takeover.stdout + takeover.stderr
    assert f"took over {run_dir.resolve()} from pid {first.process.pid} on {socket.gethostname()}" in output
    assert f"resuming {run_dir} from iteration {saved}" in output
    assert torch.load(run_dir / "last.pt", weights_only=True)["iter_num"] == saved + 10
    assert not (run_dir / rundir.HOLDER_FILE).exists()  # let go when it ended
    assert "took over" in (run_dir / "train.log").read_text()


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_requeued_job_waits_for_the_previous_attempt_to_let_go(corpus, data_root, tmp_path):
    run_dir = tmp_path / "run"
    # The previous attempt, still saving: it holds the directory until told to finish (a line on stdin).
    hold = ("import sys; from nanogpt.runtime import rundir; claim = rundir.claim(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.readline(); claim.release()")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    previous = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
    assert previous.stdout.readline().strip() == "held"
    requeued = Running([sys.executable, "-m", "nanogpt.train", *common(corpus, data_root, run_dir),
                        "max_iters=4", "eval_interval=2"], tmp_path, env={"SLURM_RESTART_COUNT": "1"})
    requeued.wait_for(f"is held by pid {previous.pid}")
    assert any("this job's previous attempt; this requeued job waits for it to end" in line
               for line in requeued.stderr + requeued.stdout)
    time.sleep(1)
    assert requeued.process.poll() is None and not (run_dir / "last.pt").exists()  # waiting, not training
    previous.communicate("done\n", timeout=60)  # the previous attempt exits
    assert requeued.process.wait(timeout=240) == 0, "\n".join(requeued.stderr)
    assert not any("took over" in line for line in requeued.stdout + requeued.stderr)  # it let go cleanly
    assert torch.load(run_dir / "last.pt", weights_only=True)["iter_num"] == 4


@pytest.mark.slow  # a torchrun job
def test_rank_0_holds_the_directory_for_the_whole_torchrun_job(corpus, data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = common(corpus, data_root, run_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    job = Running([*torchrun, "-m", "nanogpt.train", *args, *LONG, "gradient_accumulation_steps=2"], tmp_path)
    wait_for_file(run_dir / "last.pt", job)
    holder = json.loads((run_dir / rundir.HOLDER_FILE).read_text())
    environ = Path(f"/proc/{holder['pid']}/environ").read_bytes().split(b"\0")
    assert holder["pid"] in job.children() and b"RANK=0" in environ  # rank 0's process, not the launcher

    second = run_module("nanogpt.train", *args, "max_iters=5", cwd=tmp_path)
    assert second.returncode == 2 and f"pid {holder['pid']} on" in second.stderr, second.stderr
    job.stop(signal.SIGTERM)  # torchrun passes it on: the whole job stops, saves and lets go
    output = "\n".join(job.stdout + job.stderr)
    assert any(line.startswith("stopped by SIGTERM") for line in job.stdout), output
    assert not (run_dir / rundir.HOLDER_FILE).exists()


def test_the_lock_is_the_operating_systems_and_dies_with_its_process(tmp_path):
    """In-process view of the same rules: a live holder is named, a dead one's directory is free."""
    code = ("import sys; from nanogpt.runtime import rundir; rundir.claim(sys.argv[1]); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    try:
        rundir.claim(tmp_path)
        raise AssertionError("claimed a directory another process holds")
    except rundir.RunDirInUse as refused:
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(refused)
    holder.kill()
    holder.wait()
    claim = rundir.claim(tmp_path)
    try:
        assert claim.took_over["pid"] == holder.pid
        assert rundir.claim(tmp_path) is claim  # this process holds it: claiming again is a no-op
    finally:
        claim.release()
    assert not (tmp_path / rundir.HOLDER_FILE).exists()
