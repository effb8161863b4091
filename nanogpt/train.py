"""Train a GPT: ``python -m nanogpt.train [overrides]``.

Trainer.run() is the loop, read top to bottom like nanoGPT's: set the learning
rate, evaluate and checkpoint every eval_interval, take a step, log every
log_interval. What surrounds it sits behind small named calls into modules of
its own: the device and torchrun job (runtime.py), the run's records
(tracking.py), checkpoints and resuming (checkpoint.py, resume.py), early stops
(stops.py), speed (speed.py). Nothing here sees Hydra: ``python -m nanogpt.train``
goes through nanogpt/launch.py, which turns the command line into a TrainConfig.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from nanogpt import distributed, resume
from nanogpt.checkpoint import BEST, LAST, remove_stale_temporaries, save_checkpoint
from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.corpus import prepare_dataset
from nanogpt.data import BatchSampler, PreparedData, UnknownTokenError, tokenizer_codec
from nanogpt.divergence import LossWatch
from nanogpt.hf import load_pretrained
from nanogpt.model import GPT
from nanogpt.optim import build_optimizer, learning_rate_at
from nanogpt.runtime import Runtime
from nanogpt.speed import Throughput, flops_per_token
from nanogpt.stops import StopSignals, check_finite
from nanogpt.tracking import RunTracking

log = logging.getLogger("nanogpt.train")


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, sampler: BatchSampler, eval_iters: int, ctx) -> dict:
    """Mean loss over eval_iters random batches of each split, in eval mode."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        total = torch.zeros((), device=sampler.device)
        for _ in range(eval_iters):
            x, y = sampler.get_batch(split, evaluation=True)
            with ctx:
                _, loss = model(x, y)
            total += loss.float()
        losses[split] = (total / eval_iters).item()
    model.train()
    return losses


def sample_text(model: GPT, tokenizer: dict, num_tokens: int, device: torch.device) -> str:
    """What the model writes after a newline (temperature 1, top_k 200): a glance at what it learned."""
    encode, decode = tokenizer_codec(tokenizer)
    try:
        start = encode("\n")
    except UnknownTokenError:  # a character vocabulary without newlines
        start = [0]
    model.eval()
    ids = model.generate(torch.tensor([start], device=device), num_tokens, temperature=1.0, top_k=200)
    return decode(ids[0].tolist())


def build_model(cfg: ModelConfig, data: PreparedData) -> GPT:
    """A fresh GPT of the configured shape, or pretrained weights (model.init_from) for this data."""
    if cfg.init_from is None:
        return GPT(cfg.gpt_config(vocab_size=data.vocab_size))
    log.info("model: initialised from %s (shape taken from the weights)", cfg.init_from)
    return load_pretrained(cfg, data.meta["tokenizer"])


class Trainer:
    """One training run: its loop, and the state the loop changes (weights, optimizer, position)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, runtime: Runtime, data: PreparedData,
                 model: GPT, records: RunTracking, resolved_config: dict | None = None,
                 overrides: list[str] | None = None):
        self.cfg, self.run_dir, self.runtime, self.data = cfg, run_dir, runtime, data
        self.model, self.records = model.to(runtime.device), records
        self.resolved_config, self.overrides = resolved_config or {}, list(overrides or [])
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        # Loss scaling keeps fp16 gradients from underflowing; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
        self.ctx = runtime.autocast()
        if runtime.dist.enabled:  # the same weights everywhere (DDP broadcasts rank 0's), other dropout
            torch.manual_seed(cfg.seed + runtime.dist.rank)
        self.forward = runtime.wrap(self.model)
        # Every rank draws the same global batch from the same seed and keeps its own share.
        self.sampler = BatchSampler(data, cfg.model.block_size, cfg.batch_size, runtime.device, cfg.seed,
                                    rank=runtime.dist.rank, world_size=runtime.dist.world_size)
        self.accumulation = distributed.per_rank_accumulation(cfg.gradient_accumulation_steps, runtime.dist)
        tokens_per_iter = cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps
        self.throughput = Throughput(tokens_per_iter, flops_per_token(model.config, model.num_params()),
                                     runtime.peak_flops)
        self.iter_num, self.best_val_loss, self.grad_norm = 0, math.inf, torch.zeros(())
        self.loss_watch = LossWatch(runtime.device)
        self.batch = None  # the next training batch, fetched ahead
        self.last_eval_iter: int | None = None
        self.last_saved_iter: int | None = None
        self.stopped_by: int | None = None  # the signal that stopped the run early, if any

    def run(self) -> float:
        """Train to max_iters, evaluating every eval_interval; return the best validation loss."""
        cfg = self.cfg
        self.throughput.restart()
        with StopSignals(on_abort=lambda: f"during iteration {self.iter_num}; "
                                          f"{self.describe_last_checkpoint()}") as stop:
            while True:
                lr = learning_rate_at(self.iter_num, cfg.optimizer, cfg.max_iters)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                it = self.iter_num
                # A resumed run has already evaluated at the iteration it was saved at.
                if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != self.last_eval_iter:
                    self.evaluate()
                if it >= cfg.max_iters:
                    break
                loss = self.train_step()
                self.loss_watch.watch(loss, it)  # on the device; checked where a loss is logged or saved
                if it % cfg.log_interval == 0:
                    self.log_progress(loss, lr)
                self.iter_num += 1
                if stop.received is not None:
                    return self.stop_early(stop.received)
        self.finish()
        return self.best_val_loss

    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns their mean loss."""
        if self.batch is None:
            self.batch = self.sampler.get_batch("train")
        total = torch.zeros((), device=self.runtime.device)
        for micro_step in range(self.accumulation):  # this process's share of the accumulation
            x, y = self.batch
            # Across processes, gradients are averaged once, after the last micro-batch.
            with distributed.maybe_no_sync(self.forward, skip_sync=micro_step < self.accumulation - 1):
                with self.ctx:
                    _, loss = self.forward(x, y)
                    loss = loss / self.accumulation
                self.batch = self.sampler.get_batch("train")  # fetch the next batch while the device works
                self.scaler.scale(loss).backward()
            total += loss.detach()
        # The norm is tracked even without clipping (an infinite limit clips nothing).
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optimizer.grad_clip or math.inf
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.throughput.step_done()
        return total

    def evaluate(self) -> None:
        """Estimate train and val loss on every process's share of batches, record them, checkpoint."""
        self.loss_watch.check(self.describe_last_checkpoint())
        eval_iters = -(-self.cfg.eval_iters // self.runtime.dist.world_size)
        losses = estimate_loss(self.forward, self.sampler, eval_iters, self.ctx)
        losses = distributed.all_reduce_mean(losses, self.runtime.dist, self.runtime.device)
        it = self.last_eval_iter = self.iter_num
        for split in ("train", "val"):
            check_finite(losses[split], it, f"the {split} loss", self.describe_last_checkpoint())
        self.records.log({"kind": "eval", "iter": it, "tokens": it * self.throughput.tokens_per_iter,
                          "train_loss": losses["train"], "val_loss": losses["val"]})
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if self.cfg.save_checkpoints and self.runtime.dist.is_main:
            self.save_checkpoints(best=improved)
        self.throughput.restart()  # keep evaluation out of ms/iter

    def log_progress(self, loss: torch.Tensor, lr: float) -> None:
        """Log loss, lr and speed for the latest step (.item() waits for the device: only here)."""
        self.loss_watch.check(self.describe_last_checkpoint())
        it = self.iter_num
        train_loss = distributed.all_reduce_mean({"loss": loss.item()}, self.runtime.dist,
                                                 self.runtime.device)["loss"]
        self.records.log({"kind": "train", "iter": it, "tokens": (it + 1) * self.throughput.tokens_per_iter,
                          "loss": train_loss, "lr": lr, **self.throughput.measure(),
                          "grad_norm": self.grad_norm.item()})
        self.throughput.restart()

    def save_checkpoints(self, best: bool) -> None:
        """Write last.pt (with everything resuming needs) and, if best, best.pt (what sampling needs)."""
        self.loss_watch.check(self.describe_last_checkpoint())  # a diverged model is never saved
        state = {"model_config": asdict(self.model.config), "model": self.model.state_dict(),
                 "tokenizer": self.data.meta["tokenizer"], "iter_num": self.iter_num,
                 "best_val_loss": self.best_val_loss, "config": self.resolved_config}
        if best:
            save_checkpoint(self.run_dir / BEST, state)
        save_checkpoint(self.run_dir / LAST, {**state, "optimizer": self.optimizer.state_dict(),
                                              "training": self.training_state()})
        self.last_saved_iter = self.iter_num

    def training_state(self) -> dict:
        """What resuming needs beyond weights and optimizer: RNGs, next batch, progress markers."""
        return {
            "scaler": self.scaler.state_dict(), "rng": resume.capture_rng_state(),
            "sampler_rng": self.sampler.generator.get_state(),
            "eval_sampler_rng": self.sampler.eval_generator.get_state(),
            "batch": [t.cpu() for t in self.batch] if self.batch is not None else None,
            "last_eval_iter": self.last_eval_iter, "overrides": self.overrides,
            "tracker_run_id": self.records.run_id,
        }

    def restore(self, state: dict) -> None:
        """Continue from a last.pt exactly where its run was when it was saved."""
        training = state["training"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(training["scaler"])
        self.iter_num = self.last_saved_iter = state["iter_num"]
        self.best_val_loss, self.last_eval_iter = state["best_val_loss"], training["last_eval_iter"]
        self.sampler.generator.set_state(training["sampler_rng"])
        self.sampler.eval_generator.set_state(training["eval_sampler_rng"])
        if training["batch"] is not None:
            self.batch = tuple(t.to(self.runtime.device) for t in training["batch"])
        resume.restore_rng_state(training["rng"])
        remove_stale_temporaries(self.run_dir)  # left by a process killed while saving

    def describe_last_checkpoint(self) -> str:
        """Where the newest good checkpoint is, for messages about stopping."""
        if self.last_saved_iter is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is {self.run_dir / LAST} (iteration {self.last_saved_iter})"

    def stop_early(self, signum: int) -> float:
        """After a stop signal: checkpoint this step, close everything, say how to resume."""
        self.stopped_by = signum
        if self.cfg.save_checkpoints:
            self.save_checkpoints(best=False)
        self.finish()
        saved = "save_checkpoints=false: none saved"
        if self.cfg.save_checkpoints:
            saved = (f"checkpoint saved to {self.run_dir / LAST}\n"
                     f"resume with: python -m nanogpt.train resume={self.run_dir}")
        log.warning("stopped by %s after iteration %d; %s", signum.name, self.iter_num - 1, saved)
        return self.best_val_loss

    def finish(self) -> None:
        """Show (and track) a short sample of what the model learned; close the trackers."""
        log.info("best val loss %.4f; run directory %s", self.best_val_loss, self.run_dir)
        self.runtime.close()
        if self.cfg.sample_tokens > 0 and self.stopped_by is None and self.runtime.dist.is_main:
            text = sample_text(self.model, self.data.meta["tokenizer"], self.cfg.sample_tokens,
                               self.runtime.device)
            log.info("sample:\n%s", text)
            self.records.log_sample(text)
        self.records.close()


def build_trainer(cfg: TrainConfig, run_dir: Path, resolved_config: dict | None = None,
                  resume_state: dict | None = None, overrides: list[str] | None = None) -> Trainer:
    """Set up everything a run trains with, from its config (and the state it resumes from)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resume.seed_everything(cfg.seed)
    runtime = Runtime.start(cfg.device)
    data = prepare_dataset(cfg.dataset, Path(cfg.data_root))
    log.info("data: %s in %s, vocab %d, %d train / %d val tokens", cfg.dataset.name, data.directory,
             data.vocab_size, data.meta["train_tokens"], data.meta["val_tokens"])
    model = build_model(cfg.model, data)
    log.info("model: %.2fM parameters, %s", model.num_params() / 1e6, model.config)
    log.info("device: %s, dtype %s, compile %s, %d threads", runtime.device,
             str(runtime.dtype).removeprefix("torch."), runtime.compile, torch.get_num_threads())
    run_id = cfg.logger.run_id or (resume_state or {}).get("training", {}).get("tracker_run_id")
    records = RunTracking(run_dir, cfg.logger, resolved_config or {}, run_id=run_id, max_iters=cfg.max_iters)
    trainer = Trainer(cfg, run_dir, runtime, data, model, records, resolved_config, overrides)
    if resume_state is not None:
        trainer.restore(resume_state)
    return trainer


if __name__ == "__main__":
    # The command line (Hydra, resume=, torchrun's shared run directory) lives in nanogpt/launch.py,
    # which runs the importable nanogpt.train, not this __main__ copy, so launchers that pickle
    # the task (joblib, submitit) can refer to it by name.
    from nanogpt.launch import main

    main()
