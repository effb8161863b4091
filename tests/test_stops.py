"""Stopping real processes with real signals, sent from outside as a person or a scheduler would.

Each test starts an entry point, waits until it is doing the thing under test
(training, evaluating, preparing data, sampling), sends SIGINT or SIGTERM, and
checks what a user sees: the exit status, one line, no traceback, and what is
left on disk. The time from the signal to the process's exit is printed (run
with -s to see it) and bounded only generously (busy CI machines vary); the
docs/training.md quotes the printed figures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanogpt.tracking.metrics import read_metrics
from nanogpt.weights.checkpoint import load_checkpoint

from .conftest import TINY_RUN

GENEROUS_S = 30  # a stop is expected in about a second; this only catches one that never comes


class Running:
    """A process started in its own session, with its output lines collected as they come."""

    def __init__(self, command: list[str], cwd: Path, env: dict | None = None):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                    **(env or {})}
        full_env.pop("HYDRA_FULL_ERROR", None)
        self.process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self.read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.process.stdout, self.stdout),
                                              (self.process.stderr, self.stderr))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if line.startswith("stopped by"):
                Running.said_stopped = time.monotonic()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        """Wait until a line of output contains text."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stdout + self.stderr):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"never saw {text!r}:\n" + "\n".join(self.stdout + self.stderr))
            time.sleep(0.05)

    def said(self, text: str) -> bool:
        """Whether a line of output so far contains text."""
        return any(text in line for line in self.stdout + self.stderr)

    def finish(self, timeout: float) -> str:
        """Wait for the process to exit by itself; its whole stdout."""
        self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=5)
        return "".join(line + "\n" for line in self.stdout)

    def stop(self, signum: int, pid: int | None = None) -> float:
        """Send signum (to pid, default the process) and return the seconds until the process exited."""
        sent = time.monotonic()
        os.kill(pid or self.process.pid, signum)
        try:
            self.process.wait(timeout=GENEROUS_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError("no exit within 30 s:\n" + "\n".join(self.stdout + self.stderr)) from None
        latency = time.monotonic() - sent
        said = getattr(Running, "said_stopped", None)
        if said and said > sent:
            print(f"(the 'stopped' line came {said - sent:.2f} s after the signal)", end=" ")
        for reader in self.readers:
            reader.join(timeout=5)
        return latency

    def children(self) -> list[int]:
        """The process ids of the process's children (torchrun's workers)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                found.append(int(stat.parent.name))
        return found


def no_traceback(run: Running) -> None:
    assert not any("Traceback" in line for line in run.stdout + run.stderr), "\n".join(run.stderr)


@pytest.fixture
def slow_run(corpus, data_root):
    """Train arguments for a run that would go on for long: steps of a few milliseconds, no end."""
    return [*TINY_RUN, "log_interval=1", "max_iters=100000", "eval_interval=100000", "logger=none",
            "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}"]


def test_ctrl_c_during_training_stops_within_a_step(tmp_path, slow_run):
    run_dir = tmp_path / "run"
    run = Running([sys.executable, "-m", "nanogpt.train", *slow_run, f"hydra.run.dir={run_dir}"], tmp_path)
    run.wait_for("iter 20:")
    latency = run.stop(signal.SIGINT)
    print(f"SIGINT during training: exited {latency:.2f} s after the signal")
    assert run.process.returncode == 130
    no_traceback(run)
    saved = load_checkpoint(run_dir / "last.pt")
    assert run.stdout[-1] == (f"stopped by SIGINT before iteration {saved['iter_num']}: saved "
                              f"{run_dir / 'last.pt'}; resume with: python -m nanogpt.train resume={run_dir}")
    assert saved["iter_num"] > 20 and not list(run_dir.glob(".*.tmp"))
    assert not list(run_dir.glob(".run.*"))  # stopped, it let go of the directory: no lock or holder file
    # The records end where the checkpoint does: nothing is logged that the checkpoint lacks.
    assert max(r["iter"] for r in read_metrics(run_dir)) < saved["iter_num"]


def test_sigterm_during_a_long_evaluation_abandons_it_at_once(tmp_path, slow_run):
    run_dir = tmp_path / "run"
    # 2 million evaluation batches: the first evaluation alone would take half an hour, so the
    # run is long by any measure and says so (the line this waits for) after timing a few batches.
    run = Running([sys.executable, "-m", "nanogpt.train", *slow_run, "eval_iters=1000000",
                   "max_iters=1000000", f"hydra.run.dir={run_dir}"], tmp_path)
    run.wait_for("this run will take about")  # said after timing a few evaluation batches
    forecast = next(line for line in run.stdout + run.stderr if "this run will take about" in line)
    assert forecast.endswith("for a first run on this cpu, try +experiment=shakespeare_char_cpu_fast "
                             "(under a minute)"), forecast
    latency = run.stop(signal.SIGTERM)
    print(f"SIGTERM during evaluation: exited {latency:.2f} s after the signal")
    assert run.process.returncode == 143
    no_traceback(run)
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["iter_num"] == 0 and saved["training"]["last_eval_iter"] is None  # resume evaluates again
    assert run.stdout[-1].startswith("stopped by SIGTERM before iteration 0: saved ")


def test_sigint_during_the_end_of_run_sample(tmp_path, corpus, data_root):
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "max_iters=2", "eval_interval=2", "sample_tokens=1000000", "logger=none",
            "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}", f"hydra.run.dir={run_dir}"]
    run = Running([sys.executable, "-m", "nanogpt.train", *args], tmp_path)
    run.wait_for("best val loss")
    time.sleep(1.0)
    latency = run.stop(signal.SIGINT)
    print(f"SIGINT during the end-of-run sample: exited {latency:.2f} s after the signal")
    assert run.process.returncode == 130
    no_traceback(run)
    assert run.stdout[-1] == ("stopped by SIGINT during the end-of-run sample; training had finished: "
                              f"the last good checkpoint is {run_dir / 'last.pt'} (iteration 2)")
    assert (run_dir / "summary.json").is_file()  # the run's records were closed properly


def test_sigterm_during_data_preparation_leaves_the_cache_as_it_was(tmp_path, data_root):
    big = tmp_path / "big.txt"
    big.write_text("To be, or not to be, that is the question.\n" * 1_500_000)  # 66 MB: seconds to prepare
    run = Running([sys.executable, "-m", "nanogpt.data", "dataset=text", f"dataset.source={big}",
                   f"data_root={data_root}"], tmp_path)
    deadline = time.monotonic() + 120
    while not list(data_root.rglob(".lock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Into the preparation, well before its end: on a fast machine the whole of it takes about a
    # second, and a signal that lands in its last moments may find the bins already complete.
    time.sleep(0.1)
    latency = run.stop(signal.SIGTERM)
    print(f"SIGTERM during data preparation: exited {latency:.2f} s after the signal")
    assert run.process.returncode == 143
    no_traceback(run)
    assert run.stderr[-1].startswith("stopped by SIGTERM: data did not finish")
    leftovers = [p for p in data_root.rglob("*") if p.is_file() and p.name != ".lock"]
    assert not any(p.name.endswith(".tmp") for p in leftovers), leftovers
    assert not any(p.name == "meta.json" for p in leftovers)  # nothing claims to be prepared


def test_ctrl_c_in_sample_is_one_line(tmp_path, trained_run):
    _, run_dir, _ = trained_run  # sampling only reads the run
    run = Running([sys.executable, "-m", "nanogpt.sample", f"ckpt={run_dir}", "num_tokens=10000000",
                   "device=cpu"], tmp_path)
    run.wait_for("")  # the first line of text is out: it is generating
    latency = run.stop(signal.SIGINT)
    print(f"SIGINT during nanogpt.sample: exited {latency:.2f} s after the signal")
    assert run.process.returncode == 130
    no_traceback(run)
    assert run.stderr[-1].startswith("stopped by SIGINT: sample did not finish")
