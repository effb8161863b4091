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
it is written beside it, in ``.run.holder`` (host, pid, start time, and the
SLURM job and attempt), because a lock alone cannot be asked who holds it. A
holder file whose lock is free was left by a process that died: the next run
takes the directory over and says so, which is how a preempted job, requeued,
resumes unattended. A run that ends lets go of both files: it removes them
while it still holds the lock (a process waiting for it then finds the file
gone and locks a new one: filelock checks that the file it locked is still
linked), so a finished run's directory holds its results alone.

A requeued scheduler job (SLURM_RESTART_COUNT > 0) may find its directory still
held by its previous attempt (saving and exiting, or a lock that outlives its
process: a process that inherited its descriptor, a network file system that
has not noticed a lost node). It waits while that attempt can be seen alive and takes
the directory over as soon as it is gone: its pid has ended (on this host),
or, on another host, it was an earlier attempt of this same SLURM job, which
SLURM never runs beside a later one. A holder that is not its predecessor
is refused at once, as for any other run.

A new run never writes over another's files (check_new_run): a training run
aimed at a directory that already holds a run is refused unless it resumes it
(resume=, auto_resume=true), and any run is refused a directory that holds
files of the user's. Only what we made counts as a run: a directory holding a
last.pt, or the marker (RUN_MARKER) a command writes when it claims the
directory and leaves there for good, so a run stopped before its first
checkpoint (a SLURM job preempted early) still counts as one, and a folder of
someone else's files does not, whatever it holds (another Hydra program's
.hydra/ included). Nothing here imports Hydra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from nanogpt.errors import ConfigError, UserError
from nanogpt.fileio import describe_names, write_atomically
from nanogpt.weights.checkpoint import LAST

log = logging.getLogger("nanogpt.rundir")

LOCK_FILE = ".run.lock"
HOLDER_FILE = ".run.holder"
RUN_MARKER = ".nanogpt-run.json"  # which of our commands made the directory a run (module docstring)
OWN_FILES = (LOCK_FILE, HOLDER_FILE)  # what a dead holder may leave: the directory is still a new run's
POLL_S = 0.2  # how often a requeued job looks again at a predecessor it waits for
UNNAMED_POLLS = 25  # how long (in polls) a lock whose holder file is missing counts as changing hands


class RunDirInUse(UserError):
    """Another live process holds the run directory."""


class RunDirTaken(UserError):
    """The run directory already holds a run, or the user's files, and this run would write over them."""


@dataclass
class RunDirClaim:
    """The hold this process has on a run directory."""

    run_dir: Path
    lock: FileLock
    took_over: dict | None = None  # the holder file a dead process left behind, if any
    created: tuple[Path, ...] = ()  # the folders claim() made, run_dir first: what a refused start removes

    def release(self) -> None:
        """Let go: remove the holder file and the lock file while still holding the lock, then unlock.

        Removed before unlocking, never after: a process that opened the old
        file meanwhile finds it unlinked once it gets the lock, and tries again
        on a new one (filelock's check), so two never hold the directory at once.
        """
        for name in (HOLDER_FILE, LOCK_FILE):
            with contextlib.suppress(OSError):
                (self.run_dir / name).unlink()
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


def claim(run_dir: Path | str, check: Callable[[Path], None] | None = None,
          command: str | None = None) -> RunDirClaim:
    """Take run_dir for this process, or raise RunDirInUse naming the process that has it.

    Creates the directory if needed. A directory this process already holds is
    returned as it is. check(run_dir), if given, runs once the lock is held and
    before anything is written (check_new_run); if it refuses, the directory is
    left as it was found. Once it passes, command (train, bench) marks the
    directory as its run (RUN_MARKER), unless it is marked already. A requeued
    scheduler job waits for its previous attempt instead of being refused (see
    the module's docstring).
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _claims:
        return _claims[run_dir]
    created = tuple(d for d in (run_dir, *run_dir.parents) if not d.exists())
    had_lock_file = (run_dir / LOCK_FILE).exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = take_lock(run_dir)
    except OSError as error:
        raise ConfigError(f"cannot use {run_dir} as a run directory ({error.strerror or error}); "
                          "give a writable one (hydra.run.dir=...)") from None
    # Holding the lock, any holder file left is a dead process's: nobody else may write it now.
    previous = read_holder(run_dir)
    if check is not None:
        try:
            check(run_dir)
        except BaseException:  # refused: leave the directory as it was found
            if not had_lock_file:
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
            lock.release(force=True)
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    write_atomically(run_dir / HOLDER_FILE, lambda tmp: tmp.write_text(json.dumps(holder_record()) + "\n"))
    if command is not None and not (run_dir / RUN_MARKER).is_file():
        marker = {"command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomically(run_dir / RUN_MARKER, lambda tmp: tmp.write_text(json.dumps(marker) + "\n"))
    held = _claims[run_dir] = RunDirClaim(run_dir, lock, previous, created)
    return held


def take_lock(run_dir: Path) -> FileLock:
    """The directory's lock, held: at once, or (a requeued job) once its previous attempt is gone."""
    lock = FileLock(str(run_dir / LOCK_FILE), timeout=0, thread_local=False)
    waiting, unnamed = False, 0
    while True:
        try:
            lock.acquire(timeout=0)
            return lock
        except Timeout:
            holder = read_holder(run_dir)
        if holder is None and is_requeued_job() and unnamed < UNNAMED_POLLS:
            unnamed += 1  # a holder between its two files (starting, or letting go): look again
            time.sleep(POLL_S)
            continue
        if not is_requeued_job() or not is_predecessor(holder):
            raise RunDirInUse(in_use_message(run_dir, holder))
        if holder_gone(holder):
            # Its lock outlived it (a process that inherited it, a lost node's lease): a new lock file,
            # which this process holds; whatever holds the old one no longer names this directory.
            log.warning("%s was held by %s, which has ended; this requeued job takes it over", run_dir,
                        describe_holder(holder))
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            continue
        if not waiting:
            log.warning("%s is held by %s, this job's previous attempt; this requeued job waits for it to "
                        "end", run_dir, describe_holder(holder))
            waiting = True
        time.sleep(POLL_S)


def holder_record() -> dict:
    """What this process writes into the holder file: who it is, and which attempt of which SLURM job."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "job": os.environ.get("SLURM_JOB_ID"), "attempt": restart_count()}


def is_predecessor(holder: dict | None) -> bool:
    """True when holder may be this requeued job's previous attempt: this SLURM job, or one on this host.

    A holder file written before jobs were recorded has no job: it counts as one
    where it can be watched, on this host.
    """
    if not holder:
        return False
    job = os.environ.get("SLURM_JOB_ID")
    if holder.get("job") is not None:
        return holder["job"] == job and int(holder.get("attempt") or 0) < restart_count()
    return holder.get("host") == socket.gethostname()


def holder_gone(holder: dict) -> bool:
    """True once the previous attempt is known to have ended (it may still hold the lock; see take_lock).

    On this host, its pid has ended; on another host, an earlier attempt of this
    SLURM job has ended by the time SLURM starts this one.
    """
    if holder.get("host") != socket.gethostname():
        return holder.get("job") is not None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError):  # another user's process (EPERM) is alive
        return False
    return False


def check_new_run(run_dir: Path, command: str, resuming: bool = False, may_resume: bool = False) -> None:
    """Refuse a run directory that holds anything but a dead holder's lock files, unless this run resumes.

    resuming: resume= continues the training run in it. may_resume:
    auto_resume=true continues a training run there, or starts one where an
    earlier start saved nothing. Either needs a run of ours (run_made_by): a
    directory of anyone else's files is never written into, as a run's
    config.yaml, train.log and checkpoints would replace files of those names.
    """
    contents = sorted(set(os.listdir(run_dir)) - set(OWN_FILES))
    if not contents:
        return
    made_by = run_made_by(run_dir)
    fresh = "give a fresh directory (hydra.run.dir=NEW, or leave hydra.run.dir out for a dated one)"
    if made_by == "train" and (resuming or may_resume):
        return
    if made_by == "train" and command == "train":
        raise RunDirTaken(f"{run_dir} already holds a run ({describe_names(contents)}), which a new run "
                          f"would replace; to continue it: python -m nanogpt.train resume={run_dir} (or add "
                          f"auto_resume=true); to start another, {fresh}")
    if made_by is not None:
        raise RunDirTaken(f"{run_dir} already holds a run ({describe_names(contents)}); {command} writes a "
                          f"directory of its own: {fresh}")
    raise RunDirTaken(f"{run_dir} already holds {describe_names(contents)}, which no nanogpt run wrote; "
                      f"{command} writes its log, config and results there and would replace files of those "
                      f"names: {fresh}")


def run_made_by(run_dir: Path) -> str | None:
    """The command whose run run_dir holds (its marker's; train for a last.pt), or None: not a run of ours.

    A last.pt counts without a marker (runs older than the marker have none); a
    resume reads it before anything is written, and refuses one that is not ours.
    """
    try:
        marker = json.loads((run_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and isinstance(marker.get("command"), str):
        return marker["command"]
    return "train" if (run_dir / LAST).is_file() else None


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


def restart_count() -> int:
    """How many times this scheduler job was requeued (SLURM counts them in SLURM_RESTART_COUNT)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def is_requeued_job() -> bool:
    """True in a scheduler job that was requeued."""
    return restart_count() > 0
