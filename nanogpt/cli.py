"""The edge where Hydra meets the program: composing config and reporting user errors.

Every entry point (train, sample, data) is a function of a DictConfig wrapped
by hydra_entry(). A mistake the user can fix (a bad override, an unknown key, a
missing file, an absent device) is printed as one ``error:`` line and the
process exits with status 2. Set HYDRA_FULL_ERROR=1 to see the full traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import hydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from nanogpt.config import CONFIG_DIR, register_configs
from nanogpt.errors import UserError

EXIT_USER_ERROR = 2
T = TypeVar("T")


def hydra_entry(
    config_name: str, rewrite_arguments: Callable[[list[str]], list[str]] | None = None
) -> Callable[[Callable[[DictConfig], object]], Callable[[], None]]:
    """Decorate task(cfg) into a main() that composes conf/<config_name>.yaml.

    rewrite_arguments, if given, may rewrite the command line before Hydra parses
    it (train uses it to continue a run in its own directory: resume=RUN_DIR).
    """

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], None]:
        register_configs()

        @functools.wraps(task)
        def reported_task(cfg: DictConfig) -> object:
            """The task, with user errors reported before Hydra adds its own lines."""
            with reporting_user_errors():
                return task(cfg)

        hydra_main = hydra.main(
            version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name
        )(reported_task)

        @functools.wraps(task)
        def main() -> None:
            """Compose the config and run the task; user errors exit with one line."""
            debugging = bool(os.environ.get("HYDRA_FULL_ERROR"))
            # Let composition errors reach us rather than Hydra's multi-line report.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                with reporting_user_errors(debugging):
                    if rewrite_arguments is not None:
                        sys.argv[1:] = rewrite_arguments(sys.argv[1:])
                    hydra_main()
            finally:
                if not debugging:
                    os.environ.pop("HYDRA_FULL_ERROR", None)

        return main

    return decorate


@contextlib.contextmanager
def reporting_user_errors(debugging: bool | None = None) -> Iterator[None]:
    """Turn a user error into one ``error:`` line on stderr and exit status 2.

    Bugs, and every error while debugging (HYDRA_FULL_ERROR=1), keep their traceback.
    """
    if debugging is None:
        debugging = os.environ.get("NANOGPT_DEBUG") == "1"
    try:
        yield
    except Exception as error:
        if debugging or not is_user_error(error):
            raise
        # Under torchrun every process meets the same mistake; rank 0 alone reports it.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {describe_error(error)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def to_dataclass(cfg: DictConfig, schema: type[T]) -> T:
    """The composed config as an instance of its schema dataclass.

    Merging onto the schema rejects keys the schema does not have, at any depth,
    including ones added with ``+key=value``.
    """
    plain = OmegaConf.create(OmegaConf.to_container(cfg))  # drop the type Hydra gave it
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))


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


def first_line(text: str) -> str:
    """The first non-empty line of text."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())
