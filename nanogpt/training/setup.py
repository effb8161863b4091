"""Setting up a training run: its device and job, its data and its model, then the Trainer.

build_trainer() is what ``python -m nanogpt.train`` (and the benchmark) call with
a TrainConfig; every part is built before the Trainer, which is complete when its
constructor returns (resumed too, when given the state of a last.pt).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from nanogpt.dataset.pipeline import data_record, prepare_dataset, recorded_dataset
from nanogpt.runtime import distributed
from nanogpt.runtime.process import Runtime
from nanogpt.training.config import TrainConfig
from nanogpt.training.state import seed_everything
from nanogpt.training.trainer import Trainer
from nanogpt.weights import lora
from nanogpt.weights.loading import initial_model, pretrained_base

log = logging.getLogger("nanogpt.train")


def build_trainer(cfg: TrainConfig, run_dir: Path, resolved_config: dict | None = None,
                  resume: dict | None = None, overrides: list[str] | None = None) -> Trainer:
    """The Trainer of a run, from its config (and the state of the last.pt it resumes from).

    resolved_config is the composed config the run records; overrides, its command line.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    runtime = Runtime.start(cfg.device, cfg.distributed.strategy)
    with distributed.set_up_together(runtime.dist):  # a rank that fails here stops the others quietly
        base = pretrained_base(cfg.model)  # model.init_from opened (weights unread); None: from scratch
        base_tokenizer = base and base.tokenizer
        # A resumed run reads exactly the tokens its checkpoint records (or says why it cannot).
        data = (recorded_dataset(cfg.dataset, Path(cfg.data_root), resume.get("data"), base_tokenizer)
                if resume else prepare_dataset(cfg.dataset, Path(cfg.data_root), base_tokenizer))
        # Under FSDP each process builds and fills only its shards: the whole model exists nowhere.
        model = initial_model(cfg.model, data.vocab_size, data.tokenizer, base, runtime.new_model)
        model = lora.adapt(model, cfg.lora, cfg.model.init_from, runtime.dtype)
    log.info("data: %s in %s, vocab %d, %d train / %d val tokens", cfg.dataset.name, data.directory,
             data.vocab_size, data.meta["train_tokens"], data.meta["val_tokens"])
    log.info("model: %.2fM parameters, %s", model.num_params() / 1e6, model.config)
    log.info("device: %s, dtype %s, compile %s, %d threads", runtime.device,
             str(runtime.dtype).removeprefix("torch."), runtime.compile, torch.get_num_threads())
    if runtime.dist.enabled:
        log.info(runtime.describe(model))  # once: only rank 0 logs
        # The same weights everywhere (seeded alike, and DDP broadcasts), other dropout, and other
        # answers sampled (objective=grpo), with the reward's Python and NumPy generators per process too.
        seed_everything(cfg.seed + runtime.dist.rank)
    # What the run is: everything sampling, eval and resume need besides the weights.
    about = {"model_config": asdict(model.config), "tokenizer": data.meta["tokenizer"],
             "config": resolved_config or {}, "data": data_record(data),
             "chat_template": data.meta.get("chat_template")}
    return Trainer(cfg, run_dir, runtime, data, model, about, overrides or [], resume)
