"""What an evaluation task is, and the registry of them: ``nanogpt.eval task=NAME`` and training's eval_tasks.

A task scores a Subject (a model with its tokenizer, device and the tokens it
was trained on) and returns one JSON-ready dict: its metrics and how many
examples or tokens they cover. A new task is one Task subclass with its
``name`` and its ``Options`` (a dataclass whose fields are declared with
nanogpt.options.option, the first being ``name = task_name(NAME)``, so that a
task's options say which task they are wherever they travel: a composed config,
a dict); defining the subclass registers it in TASKS. Its
conf/task/NAME.yaml makes ``task=NAME`` a choice of the eval command, and a
section in nanogpt/evaluation/registry.py:TaskSettings lets training run it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from nanogpt.errors import ConfigError
from nanogpt.evaluation.tokens import TokenSplit
from nanogpt.generation.language_model import LanguageModel
from nanogpt.model import GPT
from nanogpt.options import option
from nanogpt.text.tokenizers import Tokenizer

TASKS: dict[str, type[Task]] = {}  # task name -> its Task class


@dataclass
class Subject:
    """The model under evaluation and what tasks may need around it.

    split is called only by the tasks that score the model's own tokens (loss,
    bpb), so a benchmark never prepares a dataset it does not read.
    """

    lm: LanguageModel  # the model (in eval mode, on its device) with its tokenizer and decoding loop
    batch_size: int  # sequences per forward pass: memory, never the result
    data_root: Path  # where downloaded benchmark files are cached
    split: Callable[[], TokenSplit]  # the model's own tokens to score
    split_name: str = "val"
    progress: bool = True  # a progress bar on a terminal

    @property
    def model(self) -> GPT:
        return self.lm.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.lm.tokenizer

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype


class Task:
    """One way of scoring a model. Subclasses set name and Options and implement run()."""

    name: ClassVar[str]
    Options: ClassVar[type]  # a dataclass of option() fields (an empty one if the task has none)
    key = "task"  # where the user set the options, for messages: task (nanogpt.eval), tasks.NAME (training)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        TASKS[cls.name] = cls

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def require_packages(self, needed_for: str) -> None:
        """Raise MissingPackage (errors.require_package) for an optional package the task needs."""

    def check(self) -> None:
        """Refuse, before any model is loaded, options that cannot work (a missing file or package)."""

    def run(self, subject: Subject) -> dict:
        """The JSON-ready result: metrics and the number of examples or tokens scored."""
        raise NotImplementedError

    def describe(self, result: dict) -> str:
        """One line for people (stderr): the headline figures of result."""
        return ", ".join(f"{key} {value:.4f}" for key, value in self.metrics(result).items())

    def metrics(self, result: dict) -> dict[str, float]:
        """The figures a training run records at each evaluation, each under a name of its own."""
        raise NotImplementedError


def task_name(name: str) -> Any:
    """The ``name`` field every task's Options begins with: the task they are for, and only it."""
    return option(name, "the task these options are for (task=NAME sets it)", choices=(name,))


def task_names() -> tuple[str, ...]:
    """Every registered task (the registry module imports them all)."""
    return tuple(TASKS)


def task_for(options: Any) -> Task:
    """The task options are for, built with them."""
    return TASKS[options.name](options)


def options_from(values: dict) -> Any:
    """A task's Options from a plain dict of them (a composed config's task node), named by its "name"."""
    name = values.get("name")
    if name not in TASKS:
        raise ConfigError(f"name={name!r} is not one of {', '.join(TASKS)}")
    known = {f.name for f in dataclasses.fields(TASKS[name].Options)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not an option of task={name}; its options: "
                          f"{', '.join(sorted(known))}")
    return TASKS[name].Options(**values)
