"""Measure a model: ``python -m nanogpt.eval [ckpt=SOURCE] [task=loss|bpb|hellaswag|lm_eval] [task.KEY=...]``.

task=loss (the default) is the exact loss over every window of a split (split=val
or train; of instruction data, dataset=sft, every answer token, each example on
its own); bpb, hellaswag and lm_eval are in nanogpt/evaluation/ beside it, one
module per task (registry.py lists them; docs/evaluation.md says what each
measures). ckpt= takes everything nanogpt.load takes; without it, the newest
run under outputs/ is scored. The dataset is the checkpoint's own (our runs
record it; a karpathy/nanoGPT checkpoint's train.bin/val.bin sit beside its
meta.pkl) unless dataset=... says otherwise. The last line of stdout is one JSON
object with "task", its metrics and how many examples or tokens they cover.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.dataset.config import DatasetConfig, default_data_root
from nanogpt.errors import ConfigError
from nanogpt.evaluation.registry import (
    TASKS,
    LossOptions,
    Subject,
    options_from,
    own_split,
    task_for,
    task_keys,
)
from nanogpt.generation.inference import ModelOptions, open_model
from nanogpt.options import option, require

SPLITS = ("val", "train")


@dataclass
class EvalConfig(ModelOptions):
    """Which model to score, on what."""

    task: Any = option(None, help="what to measure (task=NAME, conf/task/); each task's own keys: "
                       + task_keys())
    dataset: DatasetConfig | None = option(None, help="the tokens loss and bpb score (dataset=NAME); "
                                           "null: the dataset the checkpoint was trained on")
    data_root: str | None = option(None, help="where prepared datasets (and downloaded benchmarks) are "
                                   "cached; null: the checkpoint's own, else the default (data_root of "
                                   "nanogpt.train --help)")
    split: str = option("val", help="which split loss and bpb score", choices=SPLITS)
    batch_size: int = option(8, help="sequences per forward pass (memory, not the result)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")
        if self.task is None:
            self.task = LossOptions()
        elif isinstance(self.task, dict):  # as to_dataclass builds it from the composed task node
            try:
                self.task = options_from(self.task)
            except ConfigError as error:
                raise ConfigError(f"task.{error}") from None

    def require_packages(self) -> None:
        super().require_packages()
        task = task_for(self.task)
        task.require_packages(f"task={task.name}")


def register_task_schemas() -> None:
    """Each task's Options as the schema conf/task/NAME.yaml starts from (its defaults: task_schema/NAME)."""
    for name, task in TASKS.items():
        ConfigStore.instance().store(group="task_schema", name=name, node=task.Options, package="task")


def evaluate(cfg: EvalConfig) -> dict:
    """Run cfg.task on cfg.ckpt; the JSON-ready result, "task" first."""
    task = task_for(cfg.task)
    task.check()
    lm = open_model(cfg, "evaluating")
    loaded = lm.source
    data_root = cfg.data_root or (loaded.config.get("data_root") if loaded.kind == "run" else None)
    subject = Subject(lm, cfg.batch_size, Path(data_root or default_data_root()),
                      split=own_split(loaded, cfg.split, cfg.dataset, cfg.data_root), split_name=cfg.split)
    result = task.run(subject)
    print(task.describe(result), file=sys.stderr)
    return {"task": task.name, "ckpt": cfg.ckpt or loaded.where, **result}


@hydra_entry("eval", EvalConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: score the checkpoint and print the result, JSON on the last line."""
    print(json.dumps(evaluate(to_dataclass(cfg, EvalConfig))))


register_task_schemas()

if __name__ == "__main__":
    main()
