"""Hydra's run directory: claimed before Hydra writes into it, and removed again if the task is refused.

One writer per run directory (the lock is nanogpt/runtime/rundir.py's), and a
refused start leaves nothing behind: a run directory that Hydra made for a task
that was then refused (a bad value, a device this machine lacks) is removed
again, with the dated folders made for it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nanogpt.cli.errors import is_user_error
from nanogpt.errors import UserError, exit_with_error
from nanogpt.fileio import describe_names, folders_to_make, remove_if_empty
from nanogpt.runtime import rundir
from nanogpt.runtime.distributed import context_from_environment

MULTIRUN_FILE = "multirun.yaml"  # what Hydra's sweepers write into the sweep directory first


class ClaimRunDir(Callback):
    """Take the run directory's lock before Hydra writes anything into it (conf/train.yaml's callbacks).

    Hydra creates the directory, opens the log there and writes .hydra/ before
    the task runs; a second process aiming at a directory that a live run holds
    is refused here, first, so it touches none of that run's files; so is a new
    run aimed at a directory that already holds a run (unless it resumes it:
    resumable commands' resume= and auto_resume=true) or the user's files
    (rundir.check_new_run). (A sweep's jobs are given their directories later,
    inside the launcher: the task claims those, after Hydra's own .hydra/ files;
    their sweep directory is checked here when the sweep starts.) The task lets
    go when it ends.
    """

    def __init__(self, resumable: bool = False):
        self.resumable = resumable  # train: resume= and auto_resume=true may continue a run in its directory

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not context_from_environment().is_main:
            return  # torchrun's other ranks work in rank 0's directory, which rank 0 holds
        check = functools.partial(
            rundir.check_new_run, command=str(config.hydra.job.name),
            resuming=self.resumable and bool(OmegaConf.select(config, "resume", default=None)),
            may_resume=self.resumable and bool(OmegaConf.select(config, "auto_resume", default=False)))
        try:
            # Resolved as Hydra is about to resolve it (${now:} is cached in the config).
            rundir.claim(Path(str(config.hydra.run.dir)), check)
        except UserError as error:
            # Hydra turns a callback's exceptions into warnings and goes on; this one must stop the run.
            exit_with_error(str(error), error.exit_status)

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
    own = {str(hydra_config.output_subdir), log.name, rundir.LOCK_FILE, rundir.HOLDER_FILE}
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
