"""Every evaluation task, and the two ways they run: one at a time (``nanogpt.eval task=NAME``), and a
chosen few at every evaluation of a training run (``eval_tasks=[bpb,hellaswag]``).

Importing this module registers all tasks (each module defines its Task
subclass). TaskSettings holds one section of options per task a training run can
evaluate, each the task's own Options dataclass, so a task's options are declared
once and are set the same way wherever it runs: ``task.limit=200`` for the eval
command, ``tasks.hellaswag.limit=200`` for training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from nanogpt.dataset.batches import PreparedData
from nanogpt.dataset.config import DatasetConfig
from nanogpt.errors import ConfigError
from nanogpt.evaluation.bpb import BpbOptions, BpbTask
from nanogpt.evaluation.harness import LmEvalOptions, LmEvalTask
from nanogpt.evaluation.hellaswag import HellaSwagOptions, HellaSwagTask
from nanogpt.evaluation.loss import LossOptions, LossTask
from nanogpt.evaluation.tasks import TASKS, Subject, Task, options_from, task_for, task_names
from nanogpt.evaluation.tokens import TokenSplit, dataset_tokens
from nanogpt.generation.language_model import LanguageModel
from nanogpt.model import GPT
from nanogpt.options import option
from nanogpt.weights.loading import LoadedSource

__all__ = ["TASKS", "BpbTask", "HellaSwagTask", "LmEvalTask", "LossOptions", "LossTask", "Subject", "Task",
           "TaskSettings", "TrainingEvaluation", "options_from", "own_split", "task_for", "task_names"]


@dataclass
class TaskSettings:
    """The options of each task a training run can evaluate: ``tasks.NAME.KEY=VALUE``."""

    bpb: BpbOptions = option(default_factory=BpbOptions)
    hellaswag: HellaSwagOptions = option(default_factory=HellaSwagOptions)
    lm_eval: LmEvalOptions = option(default_factory=LmEvalOptions)


TRAINING_TASKS = tuple(f.name for f in fields(TaskSettings))  # loss is what training's own evaluation is


def task_keys() -> str:
    """Each task's own keys, for the eval command's help: "bpb: task.source; hellaswag: ..."."""
    return "; ".join(f"{name}: " + (", ".join(f"task.{f.name}" for f in fields(task.Options)
                                              if f.name != "name") or "none")
                     for name, task in TASKS.items())


def own_split(loaded: LoadedSource, split: str, dataset: DatasetConfig | None, data_root: str | None,
              key: str = "ckpt") -> Callable[[], TokenSplit]:
    """The model's own tokens to score (tokens.py:dataset_tokens), checked for its tokenizer when read."""

    def read() -> TokenSplit:
        tokens = dataset_tokens(loaded, split, dataset, data_root, key)
        if tokens.tokenizer != loaded.tokenizer:
            raise ConfigError(
                f"{key}={loaded.where} uses tokenizer {loaded.tokenizer.name} but {tokens.where} "
                f"was made with {tokens.tokenizer.name}; pick a dataset with the model's "
                "tokenizer")
        return tokens

    return read


class TrainingEvaluation:
    """A training run's eval_tasks: set up before training starts, scored at each of its evaluations.

    They score the model the run trains (its validation split for bpb) with the
    run's batch size and precision, without progress bars (the run has its own),
    and return the figures each task records (Task.metrics), for the eval record.
    """

    def __init__(self, names: list[str], settings: TaskSettings, data: PreparedData, data_root: str | Path,
                 device: torch.device, dtype: torch.dtype, batch_size: int):
        self.tasks = [TASKS[name](getattr(settings, name)) for name in names]
        for task in self.tasks:  # a missing package or file stops the run before it trains
            task.key = f"tasks.{task.name}"
            task.require_packages(f"eval_tasks=[{task.name}]")
            task.check()
        self.data, self.data_root = data, Path(data_root).expanduser()
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @classmethod
    def for_run(cls, cfg, data: PreparedData, runtime) -> TrainingEvaluation:
        """The eval_tasks of a TrainConfig, on a Runtime's device and precision."""
        return cls(cfg.eval_tasks, cfg.tasks, data, cfg.data_root, runtime.device, runtime.dtype,
                   cfg.batch_size)

    def score(self, model: GPT) -> dict[str, float]:
        """Every task's figures for model, which is left in training mode."""
        if not self.tasks:
            return {}
        tokenizer = self.data.tokenizer
        val = TokenSplit(self.data.tokens("val"), tokenizer, self.data.split_path("val"))
        trained = LoadedSource(model, tokenizer, "run", "the model being trained",
                               chat_template=self.data.meta.get("chat_template"))
        subject = Subject(LanguageModel(trained, self.device, self.dtype), self.batch_size, self.data_root,
                          split=lambda: val, progress=False)
        figures = {}
        try:
            for task in self.tasks:
                figures.update(task.metrics(task.run(subject)))
        finally:
            model.train()
        return figures
