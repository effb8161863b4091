"""The training loop and the state it owns.

Trainer.run() is the loop, read top to bottom like nanoGPT's: set the learning
rate, evaluate and checkpoint every eval_interval, take a step, log every
log_interval. Trainer.state_dict() / load_state_dict() is the one place that
says what training state is (weights, optimizer, scaler, position, best loss,
every random generator, the sampler, the batch fetched ahead): checkpoints save
it, resume loads it, and a stop that abandons a step rewinds with it. What
surrounds the loop sits behind small named calls: the device and torchrun job
(nanogpt/runtime), the run's records (nanogpt/tracking), checkpoint files
(nanogpt/weights), early stops (runtime/stops.py), speed (speed.py). Nothing
here sees Hydra: ``python -m nanogpt.train`` (nanogpt/train.py) turns the
command line into a TrainConfig and calls build_trainer().
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from nanogpt.dataset.batches import BatchSampler, PreparedData
from nanogpt.dataset.pipeline import data_record, prepare_dataset, recorded_dataset
from nanogpt.evaluation.loss import estimate_loss
from nanogpt.evaluation.registry import TrainingEvaluation
from nanogpt.generation.language_model import sample_text
from nanogpt.model import GPT
from nanogpt.runtime import distributed
from nanogpt.runtime.process import Runtime
from nanogpt.runtime.stops import Interrupted, StopSignals, check_finite
from nanogpt.tracking.forecast import RunPlan
from nanogpt.tracking.metrics import Resumed
from nanogpt.tracking.records import RunRecords
from nanogpt.training.config import TrainConfig
from nanogpt.training.divergence import LossWatch
from nanogpt.training.optim import build_optimizer, learning_rate_at
from nanogpt.training.speed import Throughput, flops_per_token
from nanogpt.training.state import capture_rng_state, restore_rng_state, seed_everything
from nanogpt.weights import lora
from nanogpt.weights.checkpoint import BEST, LAST, remove_stale_temporaries, save_checkpoint
from nanogpt.weights.loading import initial_model, pretrained_base

log = logging.getLogger("nanogpt.train")


class Trainer:
    """One training run: its loop, and the state the loop changes (weights, optimizer, position)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, runtime: Runtime, data: PreparedData,
                 model: GPT, records: RunRecords | None = None, resolved_config: dict | None = None,
                 overrides: list[str] | None = None):
        self.cfg, self.run_dir, self.runtime, self.data = cfg, run_dir, runtime, data
        self.model, self.records = model.to(runtime.device), records  # records: set by build_trainer
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
        self.eval_tasks = TrainingEvaluation.for_run(cfg, data, runtime)  # benchmarks beside the loss
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
        rewind = self.rewind_point()  # until the update, a stop may abandon the step (stops.py)
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
        with self.stop.interruptible(self.rewind_point()):  # a stop abandons it (stops.py)
            losses = estimate_loss(self.forward, self.sampler, eval_iters, self.ctx, self.eval_batch_done)
            scores = self.eval_tasks.score(self.model) if self.runtime.dist.is_main else {}
        losses = distributed.all_reduce_mean(losses, self.runtime.dist, self.runtime.device)
        it = self.last_eval_iter = self.iter_num
        for split in ("train", "val"):
            check_finite(losses[split], it, f"the {split} loss", self.describe_last_checkpoint())
        self.records.log({"kind": "eval", "iter": it, "tokens": it * self.throughput.tokens_per_iter,
                          "train_loss": losses["train"], "val_loss": losses["val"], **scores})
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

    def state_dict(self, weights: bool = True) -> dict:
        """Training state of this process, as tensors and plain data (the layout of a last.pt).

        weights=False leaves out the model and the optimizer, which a step changes
        only at its very end: that is what rewinding an abandoned step needs.
        """
        state = {"iter_num": self.iter_num, "best_val_loss": self.best_val_loss,
                 "training": {"scaler": self.scaler.state_dict(), "last_eval_iter": self.last_eval_iter,
                              "rng": capture_rng_state(), "batch": self.batch, **self.sampler.state_dict()}}
        if weights:
            state.update(model=lora.trainable_weights(self.model), optimizer=self.optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from state (a state_dict(), or a last.pt with every rank's part) exactly where it was."""
        training, context = state["training"], self.runtime.dist
        if "model" in state:
            distributed.check_world_size(training.get("world_size", 1), context.world_size)
            lora.load_trainable_weights(self.model, state["model"], state.get("lora"))
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(training["scaler"])
        self.iter_num, self.best_val_loss = state["iter_num"], state["best_val_loss"]
        self.last_eval_iter = training["last_eval_iter"]
        self.sampler.load_state_dict(training)
        own = training["ranks"][context.rank] if training.get("ranks") else training
        self.batch = None if own["batch"] is None else tuple(t.to(self.runtime.device) for t in own["batch"])
        restore_rng_state(own["rng"])

    def rewind_point(self) -> Callable[[], None]:
        """What puts the run back where it stands now, should a stop abandon the step or evaluation it begins.

        Until the optimizer updates the weights, a step changes only the batch
        fetched ahead, the random generators and the gradients, and an evaluation
        only its sampler's generator and the model's mode; put back, the state is
        that of the last completed step, which is what a stop saves.
        """
        saved = self.state_dict(weights=False)

        def rewind() -> None:
            self.load_state_dict(saved)
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train()

        return rewind

    def save_checkpoints(self, best: bool) -> None:
        """Write last.pt (with everything resuming needs) and, if best, best.pt (what sampling needs).

        Every process calls this: each rank's random state and next batch go into rank 0's file.
        """
        self.loss_watch.check(self.describe_last_checkpoint())  # a diverged model is never saved
        state = self.state_dict()
        training = state["training"]
        own = {"rng": training["rng"], "batch": None if self.batch is None else [t.cpu() for t in self.batch]}
        ranks = distributed.gather_to_main(own, self.runtime.dist)
        if not self.runtime.dist.is_main:
            return
        training.update(own, world_size=len(ranks), ranks=ranks if len(ranks) > 1 else None,
                        overrides=self.overrides, tracker_run_id=self.records.run_id)
        run = {"model_config": asdict(self.model.config), "tokenizer": self.data.meta["tokenizer"],
               "config": self.resolved_config, "data": data_record(self.data),
               "chat_template": self.data.meta.get("chat_template"), **lora.record(self.model)}
        if best:
            save_checkpoint(self.run_dir / BEST, {**run, "model": state["model"], "iter_num": self.iter_num,
                                                   "best_val_loss": self.best_val_loss})
        save_checkpoint(self.run_dir / LAST, {**run, **state})
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
            again = distributed.launch_command(f"nanogpt.train resume={self.run_dir}", self.runtime.dist)
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
            with self.stop.interruptible(alone=True), self.ctx:  # no collectives left: a signal ends it
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
    """Set up everything a run trains with, from its config (and the checkpoint it resumes from)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    runtime = Runtime.start(cfg.device)
    with distributed.set_up_together(runtime.dist):  # a rank that fails here stops the others quietly
        base = pretrained_base(cfg.model)  # model.init_from's (model, tokenizer); None: from scratch
        base_tokenizer = base and base[1]
        # A resumed run reads exactly the tokens its checkpoint records (or says why it cannot).
        data = (recorded_dataset(cfg.dataset, Path(cfg.data_root), resume_state.get("data"), base_tokenizer)
                if resume_state else prepare_dataset(cfg.dataset, Path(cfg.data_root), base_tokenizer))
        model = initial_model(cfg.model, data.vocab_size, data.meta["tokenizer"], base)
        model = lora.adapt(model, cfg.lora, cfg.model.init_from, runtime.dtype)
    log.info("data: %s in %s, vocab %d, %d train / %d val tokens", cfg.dataset.name, data.directory,
             data.vocab_size, data.meta["train_tokens"], data.meta["val_tokens"])
    log.info("model: %.2fM parameters, %s", model.num_params() / 1e6, model.config)
    log.info("device: %s, dtype %s, compile %s, %d threads", runtime.device,
             str(runtime.dtype).removeprefix("torch."), runtime.compile, torch.get_num_threads())
    trainer = Trainer(cfg, run_dir, runtime, data, model, None, resolved_config, overrides)
    resumed = None
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        trainer.last_saved_iter = trainer.iter_num
        resumed = Resumed(trainer.iter_num, trainer.last_eval_iter)
        remove_stale_temporaries(run_dir)  # left by a process killed while saving
    run_id = cfg.logger.run_id or (resume_state or {}).get("training", {}).get("tracker_run_id")
    plan = RunPlan(cfg.max_iters, cfg.eval_interval, cfg.gradient_accumulation_steps, runtime.device.type)
    trainer.records = RunRecords(run_dir, cfg.logger, resolved_config or {}, run_id=run_id, plan=plan,
                                 resumed=resumed)
    return trainer
