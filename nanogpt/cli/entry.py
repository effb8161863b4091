"""Where a command meets Hydra: composing its config, --help, and reporting user errors in one line.

Every entry point (train, sample, data, bench, eval, export) is a function of a
DictConfig wrapped by hydra_entry(). A mistake the user can fix (a bad override,
an unknown key, a missing file, an absent device) is printed as one ``error:``
line and the process exits with status 2. Set HYDRA_FULL_ERROR=1 to see the
full traceback (only "1" means on, as in Hydra). Ctrl-C or SIGTERM outside a
training loop (which has its own, see nanogpt/runtime/stops.py) ends the process with
one line and status 130 or 143, never a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from nanogpt.cli.help import help_text
from nanogpt.cli.paths import CONFIG_DIR, EXPERIMENTS_DIR
from nanogpt.cli.sweeps import register_resolvers
from nanogpt.errors import ConfigError, UserError, exit_with_error, first_line
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
            with reporting_user_errors(debugging, in_task=True):
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
                overrides = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
                print(help_text(config_name, schema, overrides))
                return
            debugging = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("NANOGPT_DEBUG") == "1"
            # Let composition errors reach us rather than Hydra's multi-line report.
            previous = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                with stopping_with_one_line(config_name), reporting_user_errors(debugging):
                    check_hydra_flags(sys.argv[1:])
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
        if context.is_main:
            exit_with_error(describe_error(error))
        if not (in_task and is_config_error(error)):
            exit_with_error(f"rank {context.rank}: {describe_error(error)}")
        sys.exit(2)


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
    return schema(**values)


def is_config_error(error: BaseException) -> bool:
    """True for a mistake in the composed config, which every process of a job meets alike."""
    return isinstance(error, (ConfigError, HydraException, OmegaConfBaseException))


def is_user_error(error: BaseException) -> bool:
    """True for errors caused by input the user controls, rather than by a bug."""
    return isinstance(error, (UserError, HydraException, OmegaConfBaseException))


def describe_error(error: BaseException) -> str:
    """One line that names the key or path at fault and what would work."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.options:
        group, _, choice = (error.missing_cfg_file or "").rpartition("/")
        if group:
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
