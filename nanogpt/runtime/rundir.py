"""One writer per run directory: a run holds an exclusive lock on its directory for as long as it lives.

Two processes writing one run directory (a requeued job starting while the old
one still shuts down, the same command with a fixed ``hydra.run.dir`` and
``auto_resume=true`` launched twice, two ``resume=`` of one run) would both write
last.pt, metrics.jsonl and the tracker's run. So the process that owns a run
(rank 0 of a torchrun job; it lives as long as the job) takes a lock on
``<run dir>/.run.lock`` before anything is written, and a second process aiming
at the same directory is refused in one line that names the holder.

The lock is the operating system's (filelock: flock on Unix), so it ends with
the process that holds it, however that process ends: killed, out of memory,
its node lost (on a network file system, once the server notices). Who holds
it is written beside it, in ``.run.holder`` (host, pid, start time), because a
lock alone cannot be asked who holds it. A holder file whose lock is free was
left by a process that died: the next run takes the directory over and says
so, which is how a preempted job, requeued, resumes unattended.

A requeued scheduler job (SLURM_RESTART_COUNT > 0) may start while its previous
attempt is still saving and exiting; it waits up to REQUEUE_WAIT_S for the
lock instead of being refused. Nothing here imports Hydra.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from nanogpt.errors import ConfigError, UserError
from nanogpt.fileio import write_atomically

log = logging.getLogger("nanogpt.rundir")

LOCK_FILE = ".run.lock"
HOLDER_FILE = ".run.holder"
REQUEUE_WAIT_S = 300.0  # a scheduler gives a stopping job about this long to save and exit


class RunDirInUse(UserError):
    """Another live process holds the run directory."""


@dataclass
class RunDirClaim:
    """The hold this process has on a run directory."""

    run_dir: Path
    lock: FileLock
    took_over: dict | None = None  # the holder file a dead process left behind, if any
    created: tuple[Path, ...] = ()  # the folders claim() made, run_dir first: what a refused start removes

    def release(self) -> None:
        """Let go: remove the holder file, then the lock (the lock file stays, as waiters share it)."""
        (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
        self.lock.release(force=True)
        _claims.pop(self.run_dir, None)

    def __enter__(self) -> RunDirClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def describe_take_over(self) -> str | None:
        """The line a run says when it took the directory over from a process that died."""
        if not self.took_over:
            return None
        return (f"took over {self.run_dir} from {describe_holder(self.took_over)}, which no longer holds it "
                "(it was killed or its node was lost)")


_claims: dict[Path, RunDirClaim] = {}  # the run directories this process holds


def claim(run_dir: Path | str, wait_s: float | None = None) -> RunDirClaim:
    """Take run_dir for this process, or raise RunDirInUse naming the process that has it.

    Creates the directory if needed. A directory this process already holds is
    returned as it is. wait_s: how long to wait for a live holder to finish
    (None: REQUEUE_WAIT_S for a requeued scheduler job, else not at all).
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _claims:
        return _claims[run_dir]
    created = tuple(d for d in (run_dir, *run_dir.parents) if not d.exists())
    lock = FileLock(str(run_dir / LOCK_FILE), timeout=0, thread_local=False)
    wait_s = (REQUEUE_WAIT_S if is_requeued_job() else 0.0) if wait_s is None else wait_s
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        holder = read_holder(run_dir)
        if wait_s <= 0:
            raise RunDirInUse(in_use_message(run_dir, holder)) from None
        log.warning("%s is held by %s; this requeued job waits up to %.0f s for it to finish",
                    run_dir, describe_holder(holder), wait_s)
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            raise RunDirInUse(in_use_message(run_dir, read_holder(run_dir))) from None
    except OSError as error:  # after Timeout, which is one too
        raise ConfigError(f"cannot use {run_dir} as a run directory ({error.strerror or error}); "
                          "give a writable one (hydra.run.dir=...)") from None
    # Holding the lock, any holder file left is a dead process's: nobody else may write it now.
    previous = read_holder(run_dir)
    mine = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomically(run_dir / HOLDER_FILE, lambda tmp: tmp.write_text(json.dumps(mine) + "\n"))
    held = _claims[run_dir] = RunDirClaim(run_dir, lock, previous, created)
    return held


def claim_of(run_dir: Path | str) -> RunDirClaim | None:
    """The claim this process holds on run_dir, if any."""
    return _claims.get(Path(run_dir).resolve())


def read_holder(run_dir: Path) -> dict | None:
    """Who holds (or last held) run_dir, from its holder file; None if there is none."""
    try:
        holder = json.loads((run_dir / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict | None) -> str:
    """'pid 123 on node7 (since 2026-11-29 10:31:07)', or what is known of it."""
    if not holder:
        return "another process (it is just starting or finishing)"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def in_use_message(run_dir: Path, holder: dict | None) -> str:
    """Why a second process may not write run_dir, and what to do instead."""
    return (f"{run_dir} is in use by {describe_holder(holder)}: one process writes a run directory at a "
            "time; wait for that run to end (or stop it), or give this one another directory")


def is_requeued_job() -> bool:
    """True in a scheduler job that was requeued (SLURM counts restarts in SLURM_RESTART_COUNT)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False
