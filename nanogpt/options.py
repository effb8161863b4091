"""Declaring a config option once: its default, its meaning and its allowed values.

Every option of the platform is a dataclass field written with option(). The
same declaration then serves the Hydra schema (the dataclass itself), ``--help``
(describe_options()), and validation (check_choices(), called from each dataclass's
__post_init__, so a config built from Python is checked as strictly as one
composed by Hydra). Nothing here imports Hydra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from nanogpt.errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "",
           choices: tuple | Callable[[], tuple] | None = None,
           default_factory: Any = dataclasses.MISSING, variant: bool = False) -> Any:
    """A dataclass field that carries its meaning (help) and, if limited, its allowed values.

    choices may be a function returning them, read when a value is checked: the
    keys of a registry (dataset sources, loggers) that grows as classes are defined.

    variant marks a model option that, set away from its default, changes the
    architecture away from GPT-2's (see GPTConfig.variants): Hugging Face export
    and GPT-2 weights (init_from) cannot carry it.
    """
    metadata = {"help": help, "choices": choices, "variant": variant}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values (None: any), reading a registry's keys now if they are given as a function."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def check_choices(config: Any) -> None:
    """Raise ConfigError for the first field whose value is not among its declared choices."""
    for f in dataclasses.fields(config):
        choices = choices_of(f)
        value = getattr(config, f.name)
        if choices and value not in choices and not is_unset(value):
            allowed = ", ".join("null" if choice is None else str(choice) for choice in choices)
            raise ConfigError(f"{f.name}={value!r} is not one of {allowed}")


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds: one line per rule in __post_init__."""
    if not condition:
        raise ConfigError(message)


def is_unset(value: Any) -> bool:
    """True for OmegaConf's '???' placeholder of a value still to be given."""
    return value == "???"


def describe_options(schema: type, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every option of schema, nested sections flattened.

    A choice-limited option's help ends with its allowed values.
    """
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from describe_options(f.default_factory, prefix=f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_text = f.metadata.get("help", "")
        if choices_of(f):
            help_text += f" [{' | '.join(map(str, choices_of(f)))}]"
        yield key, kind, default, help_text.strip()
