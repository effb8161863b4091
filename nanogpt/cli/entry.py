"""Where a command meets Hydra: composing its config, --help, and reporting user errors in one line.

Every entry point (train, sample, data, bench, eval, export) is a function of a
DictConfig wrapped by hydra_entry(). A mistake the user can fix (a bad override,
an unknown key, a missing file, an absent device) is printed as one ``error:``
line and the process exits with status 2. Set HYDRA_FULL_ERROR=1 to see the
full traceback (only "1" means on, as in Hydra). Ctrl-C or SIGTERM outside a
training loop (which has its own, see nanogpt/runtime/stops.py) ends the process with
one line and status 130 or 143, never a traceback.

A refused start leaves nothing behind: the optional packages a config needs are
checked as it is turned into its dataclass (to_dataclass), and a run directory
that Hydra made for a task that was then refused (a bad value, a device this
machine lacks) is removed again, with the dated folders made for it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import gc
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from nanogpt.cli.help import command_as_typed, help_text
from nanogpt.cli.paths import CONFIG_DIR, EXPERIMENTS_DIR
from nanogpt.cli.sweeps import register_resolvers
from nanogpt.dataset.config import DatasetConfig
from nanogpt.errors import (
    ConfigError,
    MissingPackage,
    UserError,
    check_packages,
    exit_with_error,
    first_line,
    is_installed,
)
from nanogpt.runtime import rundir
from nanogpt.runtime.distributed import context_from_environment
from nanogpt.runtime.stops import STOP_SIGNALS, STOPPED_STATUSES, Interrupted, exit_at_once

T = TypeVar("T")


def register_configs(config_name: str, schema: type) -> None:
    """Register a command's schema (as <config_name>_schema) and the experiment recipes with Hydra.

    conf/<config_name>.yaml starts from its schema. Recipes live in the top-level
    experiments/ folder rather than conf/, so they are registered here as the
    ``experiment`` group; ``+experiment=NAME`` then works from any directory and
    from an installed wheel.
    """
    register_resolvers()
    store = ConfigStore.instance()
    store.store(name=f"{config_name}_schema", node=schema)
    for recipe in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        store.store(group="experiment", name=recipe.stem, node=OmegaConf.load(recipe), package="_global_")


@functools.cache
def skip_collection_at_exit() -> None:
    """Make this process exit without Python's last garbage collection.

    At exit the collector walks every object left, and after importing torch (and
    torch._dynamo, as building any optimizer does) that takes 0.5-0.8 s: longer
    than many commands' own work. Frozen objects are skipped, and the operating
    system frees the memory anyway. Registered at exit, not done now, so a
    notebook or test that calls an entry point keeps collecting as usual.
    """
    atexit.register(gc.freeze)


def hydra_entry(
    config_name: str, schema: type,
    rewrite_arguments: Callable[[list[str]], list[str]] | None = None,
) -> Callable[[Callable[[DictConfig], object]], Callable[[], None]]:
    """Decorate task(cfg) into a main() that composes conf/<config_name>.yaml over schema.

    rewrite_arguments, if given, may rewrite the command line before Hydra parses
    it (train uses it to continue a run in its own directory: resume=RUN_DIR).
    """

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], None]:
        debugging = False  # set by main() from the user's HYDRA_FULL_ERROR

        @functools.wraps(task)
        def reported_task(cfg: DictConfig) -> object:
            """The task, with user errors reported before Hydra adds its own lines."""
            skip_collection_at_exit()  # also in a sweep's worker processes, which do not run main()
            with reporting_user_errors(debugging, in_task=True), removed_if_refused(*new_run_dir()):
                return task(cfg)

        hydra_main = hydra.main(
            version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name
        )(reported_task)

        @functools.wraps(task)
        def main() -> None:
            """Compose the config and run the task; user errors exit with one line."""
            nonlocal debugging
            skip_collection_at_exit()
            register_configs(config_name, schema)
            if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
                print(help_text(config_name, schema, sys.argv[1:], command_as_typed(config_name)))
                return
            debugging = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("NANOGPT_DEBUG") == "1"
            # Let composition errors reach us rather than Hydra's multi-line report.
            previous = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                with stopping_with_one_line(config_name), reporting_user_errors(debugging):
                    check_hydra_flags(sys.argv[1:])
                    check_unchosen_groups(config_name, sys.argv[1:])
                    if rewrite_arguments is not None:
                        sys.argv[1:] = rewrite_arguments(sys.argv[1:])
                    hydra_main()
            finally:
                if previous is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = previous

        return main

    return decorate


def check_unchosen_groups(config_name: str, argv: list[str]) -> None:
    """Refuse, in one line, a key of a group that is null by default and not chosen (Hydra asserts).

    e.g. nanogpt.eval's dataset is the checkpoint's own unless dataset=NAME is given,
    so dataset.name=x alone has nothing to set.
    """
    defaults = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml").get("defaults", [])
    unchosen = [next(iter(entry)) for entry in defaults
                if isinstance(entry, DictConfig) and list(entry.values()) == [None]]
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg and not arg.startswith("-")]
    for group in unchosen:
        if group in keys:
            continue
        for key in keys:
            if key.startswith(f"{group}."):
                options = ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
                raise ConfigError(f"{key}: no {group} is chosen (by default {config_name} takes none), so "
                                  f"it has no keys to set; choose one first: {group}=NAME {key}=... (NAME "
                                  f"one of {options})")


def check_hydra_flags(argv: list[str]) -> None:
    """Refuse, in one line, flag combinations that Hydra rejects with a traceback (a ValueError)."""
    modes = [a for a in argv if a in ("-m", "--multirun", "-c", "--cfg", "--info", "-i", "--run", "-r")]
    if len({m.lstrip("-")[0] for m in modes}) > 1:
        raise ConfigError(
            f"{' and '.join(modes)} cannot be combined (Hydra takes one of -m, --cfg, --info); to see the "
            "config of one job of a sweep, drop -m and give one value per key, e.g. optimizer.lr=1e-3"
        )


@contextlib.contextmanager
def reporting_user_errors(debugging: bool | None = None, in_task: bool = False) -> Iterator[None]:
    """Turn a user error into one ``error:`` line on stderr and exit status 2.

    Bugs, and every error while debugging (HYDRA_FULL_ERROR=1), keep their traceback.
    Under torchrun, a mistake in the config (in_task: the config every rank
    composed alike) is met by every rank at once and reported by rank 0 alone;
    anything else may be one rank's own (a file missing on its node, a GPU it
    lacks, a command line only it was given), so that rank reports it, naming itself.
    """
    if debugging is None:
        debugging = os.environ.get("NANOGPT_DEBUG") == "1"
    try:
        yield
    except Exception as error:
        if debugging or not is_user_error(error):
            raise
        context = context_from_environment()
        status = getattr(error, "exit_status", 2)
        if context.is_main:
            exit_with_error(describe_error(error), status)
        if not (in_task and is_config_error(error)):
            exit_with_error(f"rank {context.rank}: {describe_error(error)}", status)
        sys.exit(status)


@contextlib.contextmanager
def stopping_with_one_line(what: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM: one line and exit 128 + the signal, instead of a traceback or a silent death.

    SIGTERM's default would kill the process between two writes; raising instead
    lets every ``with`` and ``finally`` on the way out run (temporary files are
    removed, locks released), so the data cache and run directories stay as they were.
    """
    def interrupt(signum: int, frame) -> None:
        raise Interrupted(signal.Signals(signum))

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(f"stopped by {signum.name}: {what} did not finish; nothing half-written was left "
              "(files are renamed into place only once complete)", file=sys.stderr, flush=True)
        exit_at_once(128 + signum)
    except SystemExit as done:
        if done.code in STOPPED_STATUSES:  # a training run that stopped, saved and said so
            exit_at_once(done.code)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def to_dataclass(cfg: DictConfig, schema: type[T]) -> T:
    """The composed config as an instance of its schema dataclass, validated.

    Merging onto the schema rejects keys the schema does not have, at any depth,
    including ones added with ``+key=value``. Each section's own checks run as it
    is built; their messages then get the section's name (model.n_head=...).
    Last, the optional packages its options need are checked (errors.check_packages),
    so every command learns of a missing one before it does any work.
    """
    plain = OmegaConf.create(OmegaConf.to_container(cfg))  # drop the type Hydra gave it
    merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
    values = {}
    for f in dataclasses.fields(schema):
        node = merged[f.name]
        if not isinstance(node, (DictConfig, ListConfig)):
            values[f.name] = node
            continue
        try:
            values[f.name] = OmegaConf.to_object(node)
        except ConfigError as error:
            raise ConfigError(f"{f.name}.{error}") from None
    config = schema(**values)
    check_packages(config)
    return config


def recorded_config(cfg: DictConfig, config: object) -> dict:
    """The composed config as a run records it: resolved, with its datasets as their dataclass made them.

    DatasetConfig turns a local source into an absolute path and derives the
    cache's name from it, so what a checkpoint records still finds the data from
    any directory.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, DatasetConfig):
            resolved[f.name] = dataclasses.asdict(value)
    return resolved


# ---------------------------------------------------------------- one writer, nothing left when refused


class ClaimRunDir(Callback):
    """Take the run directory's lock before Hydra writes anything into it (conf/train.yaml's callbacks).

    Hydra creates the directory, opens the log there and writes .hydra/ before
    the task runs; a second process aiming at a directory that a live run holds
    is refused here, first, so it touches none of that run's files. (A sweep's
    jobs are given their directories later, inside the launcher: the task claims
    those, after Hydra's own .hydra/ files.) The task lets go when it ends.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not context_from_environment().is_main:
            return  # torchrun's other ranks work in rank 0's directory, which rank 0 holds
        try:
            # Resolved as Hydra is about to resolve it (${now:} is cached in the config).
            rundir.claim(Path(str(config.hydra.run.dir)))
        except UserError as error:
            # Hydra turns a callback's exceptions into warnings and goes on; this one must stop the run.
            exit_with_error(str(error), error.exit_status)


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


def is_config_error(error: BaseException) -> bool:
    """True for a mistake in the composed config, which every process of a job meets alike."""
    return isinstance(error, (ConfigError, HydraException, OmegaConfBaseException))


def is_user_error(error: BaseException) -> bool:
    """True for errors caused by input the user controls, rather than by a bug."""
    return isinstance(error, (UserError, HydraException, OmegaConfBaseException))


# Hydra's launcher and sweeper options that come from plugin packages: (group, option) ->
# (the plugin's module, the extra in pyproject.toml that installs it, its name on PyPI).
HYDRA_PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "sweeps", "hydra-joblib-launcher"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "sweeps", "hydra-optuna-sweeper"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "slurm",
                                           "hydra-submitit-launcher"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "slurm",
                                           "hydra-submitit-launcher"),
}


def missing_plugin(group: str, choice: str) -> MissingPackage | None:
    """The error for a Hydra option whose plugin package is missing; None if that is not why it failed."""
    module, extra, pip_name = HYDRA_PLUGINS.get((group, choice), (None, None, None))
    if module is None or is_installed(module):
        return None
    return MissingPackage(
        f"{group}={choice} needs the Hydra plugin {pip_name}, which is not installed: pip install {pip_name} "
        f'(or, in a clone of nanogpt, pip install -e ".[{extra}]")')


def describe_error(error: BaseException) -> str:
    """One line that names the key or path at fault and what would work."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, MissingConfigException):
        group, _, choice = (error.missing_cfg_file or "").rpartition("/")
        plugin = missing_plugin(group, choice)
        if plugin is not None:  # e.g. hydra/launcher=joblib, or slurm_ddp, whose defaults name submitit_slurm
            within = re.match(rf"In '{re.escape(group)}/([^']+)'", str(error))
            built_on = f"{group}={within.group(1)} (built on {choice})" if within else f"{group}={choice}"
            return str(plugin).replace(f"{group}={choice}", built_on, 1)
        if group and error.options:
            return f"{group}={choice} is not an option; choose one of: {', '.join(sorted(error.options))}"
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return f"unknown key '{cause.full_key}'{known_keys_hint(cause)}"
    if isinstance(error, OverrideParseException):
        return (
            f"{first_line(str(error))}; quote values with spaces or non-ASCII characters "
            """for Hydra, e.g. 'prompt="ROMÉO:"'"""
        )
    if isinstance(cause, OmegaConfBaseException):
        message = first_line(getattr(cause, "msg", None) or str(cause))
        key = getattr(cause, "full_key", None)
        return f"{key}: {message}" if key else message
    return first_line(str(error))


def known_keys_hint(error: OmegaConfBaseException) -> str:
    """'; valid keys here: ...' listing the fields of the schema the bad key was looked up in."""
    schema = getattr(error, "object_type", None)
    if schema is None or not dataclasses.is_dataclass(schema):
        return ""
    return "; valid keys here: " + ", ".join(f.name for f in dataclasses.fields(schema))
