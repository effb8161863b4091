"""Hydra's run directory: claimed before Hydra writes into it, and left as it was if the task is refused.

One writer per run directory (the lock is nanogpt/runtime/rundir.py's), and a
refused start leaves nothing behind: a run directory that Hydra made for a task
that was then refused (a bad value, a device this machine lacks) is removed
again, with the dated folders made for it; a directory that already held a run
(a resume) gets back what Hydra rewrote there before the task refused (its
record of the run in .hydra/, the log's length). What a resume can check
before Hydra writes anything (its checkpoint, what may change, whether anything
is left to do) it checks there, in ClaimRunDir's check_resume.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nanogpt.cli.errors import is_user_error
from nanogpt.errors import UserError, exit_with_error
from nanogpt.fileio import describe_names, folders_to_make, remove_if_empty, write_atomically
from nanogpt.runtime import rundir
from nanogpt.runtime.distributed import context_from_environment

MULTIRUN_FILE = "multirun.yaml"  # what Hydra's sweepers write into the sweep directory first
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes into a run's .hydra/


class NothingToDo(Exception):  # noqa: N818  (not an error: the command ends successfully)
    """The command has nothing to do here (a finished run resumed): its one line says so, and it exits 0."""


class ClaimRunDir(Callback):
    """Take the run directory's lock before Hydra writes anything into it (conf/train.yaml's callbacks).

    Hydra creates the directory, opens the log there and writes .hydra/ before
    the task runs; a second process aiming at a directory that a live run holds
    is refused here, first, so it touches none of that run's files; so is a new
    run aimed at a directory that already holds a run (unless it resumes it:
    resumable commands' resume= and auto_resume=true, whose checks run here too)
    or anyone else's files (rundir.check_new_run). (A sweep's jobs are given
    their directories later, inside the launcher: the task claims those, after
    Hydra's own .hydra/ files; their sweep directory is checked here when the
    sweep starts.) The task lets go when it ends.
    """

    resumable = False  # train's (cli/resume.py's ResumableRunDir): resume=, auto_resume=true continue a run

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not context_from_environment().is_main:
            return  # torchrun's other ranks work in rank 0's directory, which rank 0 holds
        command = str(config.hydra.job.name)
        resuming = self.resumable and bool(OmegaConf.select(config, "resume", default=None))
        may_resume = self.resumable and bool(OmegaConf.select(config, "auto_resume", default=False))

        def check(run_dir: Path) -> None:
            rundir.check_new_run(run_dir, command, resuming=resuming, may_resume=may_resume)
            if resuming or may_resume:
                self.check_resume(config, run_dir)
            if set(os.listdir(run_dir)) - set(rundir.OWN_FILES):  # it holds a run: note what Hydra rewrites
                _earlier[run_dir] = EarlierFiles.of(run_dir, config)

        try:
            # Resolved as Hydra is about to resolve it (${now:} is cached in the config).
            rundir.claim(Path(str(config.hydra.run.dir)), check, command=command)
        except UserError as error:
            # Hydra turns a callback's exceptions into warnings and goes on; this one must stop the run.
            exit_with_error(str(error), error.exit_status)
        except NothingToDo as done:
            print(done, flush=True)
            sys.exit(0)

    def check_resume(self, config: DictConfig, run_dir: Path) -> None:
        """A resumable command's checks of the run it continues in run_dir, before anything is written.

        Raises a UserError to refuse, NothingToDo when there is nothing left to do.
        """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a sweep directory that holds anything (an earlier sweep, the user's files), and note the
        folders this sweep will make, so that a sweep whose every job is refused removes them again.

        auto_resume=true may go on with an earlier sweep in its own directory.
        """
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        contents = sorted(os.listdir(sweep_dir)) if sweep_dir.is_dir() else []
        may_resume = self.resumable and bool(OmegaConf.select(config, "auto_resume", default=False))
        if contents and not (may_resume and (sweep_dir / MULTIRUN_FILE).is_file()):
            again = " (to go on with an earlier sweep there: auto_resume=true)" if self.resumable else ""
            exit_with_error(f"the sweep directory {sweep_dir} already holds {describe_names(contents)}; a "
                            "sweep writes a directory of its own: give a fresh one (hydra.sweep.dir=NEW, or "
                            f"leave it out for a dated one){again}")
        _sweeps.append((sweep_dir, tuple(folders_to_make(sweep_dir))))


_sweeps: list[tuple[Path, tuple[Path, ...]]] = []  # (sweep directory, folders made for it) of this process


def remove_refused_sweeps() -> None:
    """Remove the sweep directories this process started whose every job was refused (and removed).

    Such a sweep directory holds only Hydra's multirun.yaml; it goes, with the
    folders made for it, as every refusal leaves the disk as it found it.
    """
    while _sweeps:
        sweep_dir, made = _sweeps.pop()
        with contextlib.suppress(OSError):
            if os.listdir(sweep_dir) == [MULTIRUN_FILE]:
                (sweep_dir / MULTIRUN_FILE).unlink()
                remove_if_empty(made)


@dataclass
class EarlierFiles:
    """What a directory that already held a run had of the files a start writes before its task's checks.

    Hydra rewrites its record of the run (.hydra/) and opens the log before the
    task runs, and the claim marks the directory; should the task then refuse
    (a resume whose data is gone, a device this machine lacks), put_back()
    leaves the directory as it was found.
    """

    run_dir: Path
    files: dict[str, bytes | None]  # name inside run_dir: its bytes before, None where there was none
    folders: list[str]  # the folders among them that were not there
    log: str
    log_size: int | None

    @classmethod
    def of(cls, run_dir: Path, config: DictConfig) -> EarlierFiles:
        subdir = OmegaConf.select(config, "hydra.output_subdir", default=None)
        names = [f"{subdir}/{name}" for name in HYDRA_FILES] if subdir else []
        names.append(rundir.RUN_MARKER)
        files = {name: (run_dir / name).read_bytes() if (run_dir / name).is_file() else None
                 for name in names}
        log = run_dir / f"{config.hydra.job.name}.log"
        size = log.stat().st_size if log.is_file() else None
        absent = [str(subdir)] if subdir and not (run_dir / subdir).is_dir() else []
        return cls(run_dir, files, absent, log.name, size)

    def put_back(self) -> None:
        """Give every file back the bytes it had (or remove it), and cut the log back to its length."""
        for name, content in self.files.items():
            path = self.run_dir / name
            if content is None:
                path.unlink(missing_ok=True)
            else:
                write_atomically(path, lambda tmp, content=content: tmp.write_bytes(content))
        log = self.run_dir / self.log
        if self.log_size is None:
            log.unlink(missing_ok=True)
        elif log.is_file() and log.stat().st_size > self.log_size:
            os.truncate(log, self.log_size)
        remove_if_empty(self.run_dir / folder for folder in self.folders)


_earlier: dict[Path, EarlierFiles] = {}  # run directory: what it held before this start (ClaimRunDir)


def checks_passed(run_dir: Path) -> None:
    """The task's checks passed and it goes on: what this start wrote in run_dir stays."""
    _earlier.pop(Path(run_dir).resolve(), None)


@contextlib.contextmanager
def restored_if_refused() -> Iterator[None]:
    """If the task refuses to start (a user error before checks_passed), put back what the start rewrote."""
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        yield
    except Exception as error:
        earlier = _earlier.pop(run_dir, None)
        if earlier is not None and is_user_error(error) and context_from_environment().is_main:
            earlier.put_back()
        raise
    finally:
        _earlier.pop(run_dir, None)


def release_run_dir() -> None:
    """Let go of the task's run directory if this process holds it (every command, however it ended)."""
    claim = rundir.claim_of(HydraConfig.get().runtime.output_dir)
    if claim is not None:
        claim.release()


def new_run_dir() -> tuple[Path | None, tuple[Path, ...]]:
    """(the task's run directory, the folders this start made for it) if it just made it, else (None, ()).

    Just made: it holds only what Hydra (and the run-directory lock) put there.
    Which folders were made is known exactly where ClaimRunDir claimed the
    directory before Hydra made it; otherwise they are the folders Hydra named
    itself (hydra_named_folders). Commands that write no run directory
    (output_subdir null: sample, eval, and torchrun's other ranks) have none.
    """
    hydra_config = HydraConfig.get()
    if hydra_config.output_subdir is None:
        return None, ()
    run_dir = Path(hydra_config.runtime.output_dir).resolve()
    log = run_dir / f"{hydra_config.job.name}.log"
    own = {str(hydra_config.output_subdir), log.name, rundir.LOCK_FILE, rundir.HOLDER_FILE, rundir.RUN_MARKER}
    try:
        empty_log = not log.exists() or log.stat().st_size == 0
        fresh = empty_log and all(p.name in own for p in run_dir.iterdir())
    except OSError:
        return None, ()
    if not fresh or run_dir == Path.cwd().resolve():
        return None, ()
    claim = rundir.claim_of(run_dir)
    return run_dir, claim.created if claim else hydra_named_folders(run_dir)


@contextlib.contextmanager
def removed_if_refused(run_dir: Path | None, made: tuple[Path, ...]) -> Iterator[None]:
    """Remove run_dir (just made) if the task refuses to start, and the now empty folders made for it.

    Only a refusal counts (a user error), and only while the run has recorded
    nothing (no checkpoint, no metrics): a run that trained keeps its directory.
    """
    try:
        yield
    except Exception as error:
        if run_dir is not None and is_user_error(error) and context_from_environment().is_main \
                and not has_records(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only while empty: never another run's
        raise


def has_records(run_dir: Path) -> bool:
    """True once a run has recorded something worth keeping: a checkpoint, or a line of metrics."""
    metrics = run_dir / "metrics.jsonl"
    return any(run_dir.glob("*.pt")) or (metrics.is_file() and metrics.stat().st_size > 0)


def hydra_named_folders(run_dir: Path) -> tuple[Path, ...]:
    """The trailing folders of run_dir that hydra.run.dir names with interpolations: a start makes those.

    outputs/${now:%Y-%m-%d}/${now:%H-%M-%S} gives the time's and the date's
    folders; a fixed hydra.run.dir, or a sweep's job, the directory itself.
    """
    hydra_config = HydraConfig.get()
    levels = 1
    if hydra_config.mode != RunMode.MULTIRUN:
        parts = Path(str(OmegaConf.to_container(hydra_config.run, resolve=False)["dir"])).parts
        levels = len(parts) - next((i for i, part in enumerate(parts) if "${" in part), len(parts) - 1)
    return (run_dir, *run_dir.parents)[:levels]
