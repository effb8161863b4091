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
from nanogpt.options import check_choices, option, require
from nanogpt.runtime.device import DeviceConfig, resolve_device, resolve_dtype
from nanogpt.weights.checkpoint import newest_checkpoint
from nanogpt.weights.loading import require_source_packages, resolve_source
from nanogpt.weights.quantize import quantize_model, quantize_option

SPLITS = ("val", "train")


@dataclass
class EvalConfig:
    """Which model to score, on what."""

    ckpt: str | None = option(None, help="the model: a run dir or .pt file, nanoGPT's out_dir or ckpt.pt, "
                              "a Hugging Face directory, or gpt2 | gpt2-medium | gpt2-large | gpt2-xl; "
                              "null: the newest run under `outputs`")
    outputs: str = option("outputs", help="where to look for the newest run when ckpt is not given")
    task: Any = option(None, help="what to measure (task=NAME, conf/task/); each task's own keys: "
                       + task_keys())
    meta: str | None = option(None, help="karpathy/nanoGPT checkpoints: their meta.pkl, when it is not "
                              "data/<dataset>/meta.pkl under the current directory")
    dataset: DatasetConfig | None = option(None, help="the tokens loss and bpb score (dataset=NAME); "
                                           "null: the dataset the checkpoint was trained on")
    data_root: str | None = option(None, help="where prepared datasets (and downloaded benchmarks) are "
                                   "cached; null: the checkpoint's own, else the default (data_root of "
                                   "nanogpt.train --help)")
    split: str = option("val", help="which split loss and bpb score", choices=SPLITS)
    batch_size: int = option(8, help="sequences per forward pass (memory, not the result)")
    quantize: str | None = quantize_option()
    device: DeviceConfig = option(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")
        if self.task is None:
            self.task = LossOptions()
        elif isinstance(self.task, dict):  # as to_dataclass builds it from the composed task node
            try:
                self.task = options_from(self.task)
            except ConfigError as error:
                raise ConfigError(f"task.{error}") from None

    def require_packages(self) -> None:
        require_source_packages(self.ckpt)
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
    source = cfg.ckpt or newest_checkpoint(cfg.outputs)
    if not cfg.ckpt:
        print(f"evaluating the newest run's checkpoint: {source}", file=sys.stderr)
    device = resolve_device(cfg.device.name)
    loaded = resolve_source(source, key="ckpt", meta=cfg.meta)
    data_root = cfg.data_root or (loaded.config.get("data_root") if loaded.kind == "run" else None)
    subject = Subject(
        quantize_model(loaded.model.to(device).eval(), cfg.quantize, device), loaded.tokenizer, device,
        resolve_dtype(cfg.device.dtype, device), cfg.batch_size, Path(data_root or default_data_root()),
        split=own_split(loaded, cfg.split, cfg.dataset, cfg.data_root), split_name=cfg.split)
    result = task.run(subject)
    print(task.describe(result), file=sys.stderr)
    return {"task": task.name, "ckpt": str(source), **result}


@hydra_entry("eval", EvalConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: score the checkpoint and print the result, JSON on the last line."""
    print(json.dumps(evaluate(to_dataclass(cfg, EvalConfig))))


register_task_schemas()

if __name__ == "__main__":
    main()
