"""Errors a user can fix, as opposed to bugs.

Entry points print a UserError as one line and exit non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""

import importlib.util
import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in input the user controls: config, files, devices, prompts."""


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


def require_package(module: str, extra: str, needed_for: str, pip_name: str | None = None) -> None:
    """Raise MissingPackage unless module can be imported; the message says how to install it.

    extra is the project's optional-dependency group that holds it (pyproject.toml),
    for a clone; pip_name is what ``pip install`` takes, for an installed package.
    """
    if importlib.util.find_spec(module) is None:
        raise MissingPackage(
            f"{needed_for} needs the optional package {pip_name or module}, which is not installed: "
            f"pip install {pip_name or module} (or, in a clone of nanogpt, pip install -e \".[{extra}]\")")


def first_line(text: str) -> str:
    """The first non-empty line of text: what a one-line error report shows."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def exit_with_error(message: str) -> NoReturn:
    """Print the one ``error:`` line a user error gets and exit with EXIT_USER_ERROR."""
    print(f"error: {first_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
