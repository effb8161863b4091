"""One line for every error a user can fix, and for a stop: what each command prints instead of a traceback.

A mistake the user can fix (a bad override, an unknown key, a missing file, an
absent device) is printed as one ``error:`` line and the process exits with
status 2. Set HYDRA_FULL_ERROR=1 to see the full traceback (only "1" means on,
as in Hydra). Ctrl-C or SIGTERM outside a training loop (which has its own,
see nanogpt/runtime/stops.py) ends the process with one line and status 130 or
143, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from nanogpt.errors import (
    ConfigError,
    MissingPackage,
    UserError,
    WriteFailed,
    describe_library_error,
    exit_with_error,
    first_line,
    is_installed,
    library_failure,
)
from nanogpt.fileio import is_refused_write, write_failed
from nanogpt.runtime.distributed import context_from_environment
from nanogpt.runtime.stops import STOP_SIGNALS, STOPPED_STATUSES, Interrupted, exit_at_once


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
        error = as_write_failed(error) if is_refused_write(error) else error
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


def is_config_error(error: BaseException) -> bool:
    """True for a mistake in the composed config, which every process of a job meets alike."""
    return isinstance(error, (ConfigError, HydraException, OmegaConfBaseException))


def is_user_error(error: BaseException) -> bool:
    """True for errors caused by input the user controls, rather than by a bug.

    A write the file system refused (a full disk, a quota) is the user's to fix
    too, wherever it happened: the places that write files say so in their own
    terms (fileio.write_failed), and as_write_failed says it for any other. So
    is a failure inside a library we drive (errors.library_failure): it comes of
    what the user gave it.
    """
    return (isinstance(error, (UserError, HydraException, OmegaConfBaseException)) or is_refused_write(error)
            or library_failure(error) is not None)


def as_write_failed(error: OSError) -> WriteFailed:
    """The full-disk message for a refused write that no writer reported in its own terms."""
    if error.filename is not None:
        return write_failed(Path(error.filename), error)
    return WriteFailed(f"a write was refused: {error.strerror or error}; free some space (or choose another "
                       "directory) and run again")


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
    ambiguous = re.match(r"Ambiguous value for argument '([^=']+)=(.*)'", str(error))
    if ambiguous:  # Hydra's advice takes three more lines; the same, in one
        key, value = ambiguous.groups()
        return (f"{key}={value}: Hydra reads a comma as several values; for one value that holds commas, "
                f"""quote it inside the shell's quotes: "{key}='{value}'"; for a list: {key}=[{value}]; """
                "to sweep over the values: add -m")
    if isinstance(cause, OmegaConfBaseException):
        message = first_line(getattr(cause, "msg", None) or str(cause))
        key = getattr(cause, "full_key", None)
        return f"{key}: {message}" if key else message
    library = library_failure(error)
    if library is not None:
        return f"{library} failed: {describe_library_error(error)}; NANOGPT_DEBUG=1 shows the whole traceback"
    return first_line(str(error))


def known_keys_hint(error: OmegaConfBaseException) -> str:
    """'; valid keys here: ...' listing the fields of the schema the bad key was looked up in."""
    schema = getattr(error, "object_type", None)
    if schema is None or not dataclasses.is_dataclass(schema):
        return ""
    return "; valid keys here: " + ", ".join(f.name for f in dataclasses.fields(schema))
