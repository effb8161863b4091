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
from nanogpt.checkpoint import BEST, LAST, save_checkpoint
from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.data import BatchSampler, PreparedData, UnknownTokenError, prepare_dataset, tokenizer_codec
from nanogpt.divergence import LossWatch
from nanogpt.loading import initial_model
from nanogpt.model import GPT
from nanogpt.optim import build_optimizer, learning_rate_at
from nanogpt.runtime import Runtime
from nanogpt.speed import Throughput, flops_per_token
from nanogpt.stops import Interrupted, StopSignals, check_finite
from nanogpt.tracking import RunPlan, RunTracking

log = logging.getLogger("nanogpt.train")


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, sampler: BatchSampler, eval_iters: int, ctx,
                  batch_done=lambda done, total: None) -> dict:
    """Mean loss over eval_iters random batches of each split, batch_done(n, of) after each."""
    model.eval()
    losses = {}
    for s, split in enumerate(("train", "val")):
        total = torch.zeros((), device=sampler.device)
        for i in range(eval_iters):
            x, y = sampler.get_batch(split, evaluation=True)
            with ctx:
                _, loss = model(x, y)
            total += loss.float()
            batch_done(s * eval_iters + i + 1, 2 * eval_iters)
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
    return initial_model(cfg, data.meta["tokenizer"])


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
        self.stop = StopSignals()  # replaced by the active one while run() runs

    def run(self) -> float:
        """Train to max_iters, evaluating every eval_interval; return the best validation loss."""
        cfg = self.cfg
        self.throughput.restart()
        self.stop = StopSignals(on_abort=lambda: f"during iteration {self.iter_num}; "
                                                 f"{self.describe_last_checkpoint()}",
                                agree=self.runtime.vote.poll, alone=not self.runtime.dist.enabled)
        with self.stop, self.stop.stopping_early(self.stop_early):
            while True:
                lr = learning_rate_at(self.iter_num, cfg.optimizer, cfg.max_iters)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                it = self.iter_num
                # A resumed run has already evaluated at the iteration it was saved at.
                due = (it % cfg.eval_interval == 0 and (it > 0 or cfg.eval_at_start)) or it == cfg.max_iters
                if due and it != self.last_eval_iter:
                    self.evaluate()
                if it >= cfg.max_iters:
                    break
                loss = self.train_step()
                self.loss_watch.watch(loss, it)  # on the device; checked where a loss is logged or saved
                if it % cfg.log_interval == 0:
                    self.log_progress(loss, lr)
                self.iter_num += 1
                self.stop.stop_here()  # every process of the job stops after the same step
            self.finish()
        return self.best_val_loss

    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns their mean loss."""
        if self.batch is None:
            self.batch = self.sampler.get_batch("train")
        total = torch.zeros((), device=self.runtime.device)
        rewind = resume.rewind_point(self)  # until the update, a stop may abandon the step (stops.py)
        for micro_step in range(self.accumulation):  # this process's share of the accumulation
            x, y = self.batch
            # Across processes, gradients are averaged once, after the last micro-batch.
            with self.stop.interruptible(rewind), \
                    distributed.maybe_no_sync(self.forward, skip_sync=micro_step < self.accumulation - 1):
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
        with self.stop.interruptible(resume.rewind_point(self)):  # a stop abandons it (stops.py)
            losses = estimate_loss(self.forward, self.sampler, eval_iters, self.ctx, self.eval_batch_done)
        losses = distributed.all_reduce_mean(losses, self.runtime.dist, self.runtime.device)
        it = self.last_eval_iter = self.iter_num
        for split in ("train", "val"):
            check_finite(losses[split], it, f"the {split} loss", self.describe_last_checkpoint())
        self.records.log({"kind": "eval", "iter": it, "tokens": it * self.throughput.tokens_per_iter,
                          "train_loss": losses["train"], "val_loss": losses["val"]})
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if self.cfg.save_checkpoints:
            self.save_checkpoints(best=improved)
        self.throughput.restart()  # keep evaluation out of ms/iter

    def eval_batch_done(self, done: int, total: int) -> None:
        """Show evaluation's progress; stop it where the whole job agrees to (under torchrun)."""
        self.records.eval_progress(done, total, self.iter_num)
        self.stop.stop_here()

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
        """Write last.pt (with everything resuming needs) and, if best, best.pt (what sampling needs).

        Every process calls this: each rank's random state and next batch go into rank 0's file.
        """
        self.loss_watch.check(self.describe_last_checkpoint())  # a diverged model is never saved
        ranks = distributed.gather_to_main(resume.rank_state(self.batch), self.runtime.dist)
        if not self.runtime.dist.is_main:
            return
        state = {"model_config": asdict(self.model.config), "model": self.model.state_dict(),
                 "tokenizer": self.data.meta["tokenizer"], "iter_num": self.iter_num,
                 "best_val_loss": self.best_val_loss, "config": self.resolved_config}
        if best:
            save_checkpoint(self.run_dir / BEST, state)
        save_checkpoint(self.run_dir / LAST, {**state, "optimizer": self.optimizer.state_dict(),
                                              "training": resume.training_state(self, ranks)})
        self.last_saved_iter = self.iter_num

    def describe_last_checkpoint(self) -> str:
        """Where the newest good checkpoint is, for messages about stopping."""
        if self.last_saved_iter is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is {self.run_dir / LAST} (iteration {self.last_saved_iter})"

    def stop_early(self, signum: int) -> float:
        """After a stop signal: save the last completed step, close everything, say how to resume."""
        self.stopped_by = signum
        if self.cfg.save_checkpoints:
            self.save_checkpoints(best=False)
        self.records.close()
        distributed.barrier(self.runtime.dist)  # nobody exits, tearing the job down, before rank 0 saved
        self.runtime.close()
        saved = "save_checkpoints=false: nothing saved"
        if self.cfg.save_checkpoints:
            again = resume.command(self.run_dir, self.runtime.dist)
            saved = f"saved {self.run_dir / LAST}; resume with: {again}"
        if self.runtime.dist.is_main:
            log.warning("stopped by %s before iteration %d: %s", signum.name, self.iter_num, saved)
        return self.best_val_loss

    def finish(self) -> None:
        """Show (and track) a short sample of what the model learned; close the trackers."""
        log.info("best val loss %.4f; run directory %s", self.best_val_loss, self.run_dir)
        distributed.barrier(self.runtime.dist)  # ranks tear the job down together, as after a stop
        self.runtime.close()
        try:
            with self.stop.interruptible(alone=True):  # no collectives left: a signal ends it at once
                if self.cfg.sample_tokens > 0 and self.runtime.dist.is_main:
                    text = sample_text(self.model, self.data.meta["tokenizer"], self.cfg.sample_tokens,
                                       self.runtime.device)
                    log.info("sample:\n%s", text)
                    self.records.log_sample(text)
        except Interrupted as stop:
            self.stopped_by = stop.signum
            log.warning("stopped by %s during the end-of-run sample; training had finished: %s",
                        stop.signum.name, self.describe_last_checkpoint())
        self.records.close()


def build_trainer(cfg: TrainConfig, run_dir: Path, resolved_config: dict | None = None,
                  resume_state: dict | None = None, overrides: list[str] | None = None) -> Trainer:
    """Set up everything a run trains with, from its config (and the state it resumes from)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resume.seed_everything(cfg.seed)
    runtime = Runtime.start(cfg.device)
    with distributed.set_up_together(runtime.dist):  # a rank that fails here stops the others quietly
        data = prepare_dataset(cfg.dataset, Path(cfg.data_root))
        model = build_model(cfg.model, data)
    log.info("data: %s in %s, vocab %d, %d train / %d val tokens", cfg.dataset.name, data.directory,
             data.vocab_size, data.meta["train_tokens"], data.meta["val_tokens"])
    log.info("model: %.2fM parameters, %s", model.num_params() / 1e6, model.config)
    log.info("device: %s, dtype %s, compile %s, %d threads", runtime.device,
             str(runtime.dtype).removeprefix("torch."), runtime.compile, torch.get_num_threads())
    run_id = cfg.logger.run_id or (resume_state or {}).get("training", {}).get("tracker_run_id")
    plan = RunPlan(cfg.max_iters, cfg.eval_interval, cfg.gradient_accumulation_steps, runtime.device.type)
    records = RunTracking(run_dir, cfg.logger, resolved_config or {}, run_id=run_id, plan=plan,
                          resumed=resume.progress(resume_state))
    trainer = Trainer(cfg, run_dir, runtime, data, model, records, resolved_config, overrides)
    if resume_state is not None:
        resume.restore_training_state(trainer, resume_state)
    return trainer


if __name__ == "__main__":
    # The command line (Hydra, resume=, torchrun's shared run directory) lives in nanogpt/launch.py,
    # which runs the importable nanogpt.train, not this __main__ copy, so launchers that pickle
    # the task (joblib, submitit) can refer to it by name.
    from nanogpt.launch import main

    main()
