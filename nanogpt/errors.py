"""Errors a user can fix, as opposed to bugs, and the check that optional packages are installed.

Entry points print a UserError as one line and exit with its exit_status (2,
or 1 for a write the machine refused), without a traceback; anything else is a
bug and keeps its traceback.

An error raised inside one of the libraries nanogpt drives (LIBRARIES: lm-eval,
peft, transformers, tokenizers, ...) is one line too, naming the library and
keeping its own message (library_failure): it comes of what the user handed
it (a task's YAML, a weights file, a LoRA option), not of a bug of ours.

Optional packages are checked before any work (check_packages): a config
section whose options need one declares it in a ``require_packages()`` method
that calls require_package(), e.g. LoggerConfig for logger=tensorboard. Every
command's composed config is walked, sections inside sections too, so a new
section joins by defining that method; no central table lists them.
"""

import dataclasses
import functools
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import NoReturn

EXIT_USER_ERROR = 2
# The libraries whose failures are reported in one line (by their import name, as the user knows them).
LIBRARIES = {"lm_eval": "lm-eval", "peft": "peft", "transformers": "transformers", "tokenizers": "tokenizers",
             "safetensors": "safetensors", "huggingface_hub": "huggingface_hub", "datasets": "datasets",
             "tiktoken": "tiktoken", "requests": "requests"}


class UserError(Exception):
    """A mistake in input the user controls: config, files, devices, prompts."""

    exit_status = EXIT_USER_ERROR


class ConfigError(UserError):
    """A config value that is wrong or impossible; the message names the key."""


class DataError(UserError):
    """A dataset source that is missing, unreachable or not what was expected."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or incompatible."""


class DeviceError(UserError):
    """A device that was asked for but is not available here."""


class MissingPackage(UserError):
    """An optional package that a chosen feature needs is not installed."""


class WriteFailed(UserError):
    """The file system refused a write (full, read-only, quota); the file it was replacing is intact.

    Not the user's typing, but theirs to fix (free space, another directory),
    so it is one line too; exit status 1, as for a run that failed.
    """

    exit_status = 1


def is_installed(module: str) -> bool:
    """True when module (dotted names too) can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module without a spec
        return False


def require_package(module: str, extra: str, needed_for: str, pip_name: str | None = None) -> None:
    """Raise MissingPackage unless module can be imported; the message says how to install it.

    extra is the project's optional-dependency group that holds it (pyproject.toml),
    for a clone; pip_name is what ``pip install`` takes, for an installed package.
    """
    if not is_installed(module):
        raise MissingPackage(
            f"{needed_for} needs the optional package {pip_name or module}, which is not installed: "
            f"pip install {pip_name or module} (or, in a clone of nanogpt, pip install -e \".[{extra}]\")")


def check_packages(config: object) -> None:
    """Call require_packages() on config and on every config section inside it that defines one.

    A command runs this on its composed config before it does any work or writes
    any file, so a missing optional package is one line, not a traceback late in a run.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return
    if hasattr(config, "require_packages"):
        config.require_packages()
    for field in dataclasses.fields(config):
        check_packages(getattr(config, field.name))


def first_line(text: str) -> str:
    """The first non-empty line of text: what a one-line error report shows."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def exit_with_error(message: str, status: int = EXIT_USER_ERROR) -> NoReturn:
    """Print the one ``error:`` line a user error gets and exit with status (EXIT_USER_ERROR)."""
    print(f"error: {first_line(message)}", file=sys.stderr, flush=True)
    sys.exit(status)


@functools.cache
def package_folder(module: str) -> Path | None:
    """Where an installed package's files are, if it is installed (found without importing it)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]).resolve() if locations else None


def library_failure(error: BaseException) -> str | None:
    """The library (of LIBRARIES) in whose code error was raised, or None.

    That is the library of the first frame after the last frame of nanogpt's own
    code (or of the first frame, when none is ours): an error that our code
    raised, or that was raised in code of ours the library called back (our
    lm-eval model), is not the library's, and keeps its traceback as a bug.
    """
    frames = traceback.extract_tb(error.__traceback__)
    ours = package_folder("nanogpt")
    last_ours = max((i for i, frame in enumerate(frames)
                     if ours is not None and Path(frame.filename).resolve().is_relative_to(ours)), default=-1)
    for frame in frames[last_ours + 1:]:
        path = Path(frame.filename).resolve()
        for module, name in LIBRARIES.items():
            folder = package_folder(module)
            if folder is not None and path.is_relative_to(folder):
                return name
    return None


def describe_library_error(error: BaseException) -> str:
    """'TypeError: what it said (in lm_eval/api/task.py, process_results)': a library's error in one line."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (in {library_path(frames[-1].filename)}, {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {first_line(str(error)) or 'no message'}{where}"


def library_path(filename: str) -> str:
    """A file of a library as 'lm_eval/api/task.py' (from its package down); another file by its name."""
    path = Path(filename).resolve()
    for module in LIBRARIES:
        folder = package_folder(module)
        if folder is not None and path.is_relative_to(folder):
            return path.relative_to(folder.parent).as_posix()
    return path.name
