"""The edge where Hydra meets the program: composing config and reporting user errors.

Every entry point (train, sample, data) is a function of a DictConfig wrapped
by hydra_entry(). A mistake the user can fix (a bad override, an unknown key, a
missing file, an absent device) is printed as one ``error:`` line and the
process exits with status 2. Set HYDRA_FULL_ERROR=1 to see the full traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable

import hydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from nanogpt.config import CONFIG_DIR, register_configs
from nanogpt.errors import UserError

EXIT_USER_ERROR = 2


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], None]]:
    """Decorate task(cfg) into a main() that composes conf/<config_name>.yaml."""

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], None]:
        register_configs()
        hydra_main = hydra.main(
            version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name
        )(task)

        @functools.wraps(task)
        def main() -> None:
            """Run the task; print user errors as one line and exit non-zero."""
            debugging = bool(os.environ.get("HYDRA_FULL_ERROR"))
            # Let exceptions reach us rather than Hydra's multi-line report.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                hydra_main()
            except Exception as error:
                if debugging or not is_user_error(error):
                    raise
                print(f"error: {describe_error(error)}", file=sys.stderr, flush=True)
                sys.exit(EXIT_USER_ERROR)
            finally:
                if not debugging:
                    os.environ.pop("HYDRA_FULL_ERROR", None)

        return main

    return decorate


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
    if isinstance(cause, ConfigKeyError) and getattr(cause, "full_key", None):
        return f"unknown key '{cause.full_key}'{known_keys_hint(cause)}"
    if isinstance(cause, OmegaConfBaseException):
        message = first_line(getattr(cause, "msg", None) or str(cause))
        key = getattr(cause, "full_key", None)
        return f"{key}: {message}" if key else message
    return first_line(str(error))


def known_keys_hint(error: ConfigKeyError) -> str:
    """'; valid keys here: ...' listing the fields of the schema the bad key was looked up in."""
    schema = getattr(error, "object_type", None)
    if schema is None or not dataclasses.is_dataclass(schema):
        return ""
    return "; valid keys here: " + ", ".join(f.name for f in dataclasses.fields(schema))


def first_line(text: str) -> str:
    """The first non-empty line of text."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())
