"""The training loop: Trainer.run(), read top to bottom like nanoGPT's.

A Trainer is a TrainingState (state.py: what a run has reached, so what a last.pt
holds) with the loop that moves it on. setup.py builds one from a TrainConfig.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from nanogpt.dataset.batches import BatchSampler, PreparedData
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
from nanogpt.training.objectives import Objective
from nanogpt.training.optim import build_optimizer, learning_rate_at
from nanogpt.training.speed import Throughput
from nanogpt.training.state import TrainingState
from nanogpt.weights.checkpoint import RunCheckpoints

log = logging.getLogger("nanogpt.train")


class Trainer(TrainingState):
    """One training run: the loop, and the state it changes (weights, optimizer, position).

    about says what the run is (model shape, tokenizer, config, data), overrides how it was
    started; both are saved with its state. resume: a last.pt's state_dict() to go on from.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, runtime: Runtime, data: PreparedData,
                 model: GPT, about: dict | None = None, overrides: list[str] = (),
                 resume: dict | None = None):
        self.cfg, self.run_dir, self.runtime, self.data = cfg, run_dir, runtime, data
        self.model, self.about, self.overrides = model.to(runtime.device), about or {}, overrides
        dist = runtime.dist
        self.forward = runtime.wrap(self.model)  # DDP, compiled; sharded, it came so (new_model)
        self.objective = Objective.for_run(cfg, self.model, runtime, data)  # before resume
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        # Loss scaling keeps fp16 gradients from underflowing; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(runtime.device.type,
                                           enabled=runtime.dtype == torch.float16)
        self.ctx = runtime.autocast()
        # Every rank draws the same global batch from the same seed and keeps its own share.
        self.sampler = BatchSampler(data, cfg.model.block_size, cfg.batch_size, runtime.device,
                                    cfg.seed, rank=dist.rank, world_size=dist.world_size)
        self.accumulation = distributed.per_rank_accumulation(cfg.gradient_accumulation_steps, dist)
        self.throughput = Throughput.of_run(cfg, model, runtime.peak_flops)
        self.iter_num, self.best_val_loss, self.grad_norm = 0, math.inf, torch.zeros(())
        self.loss_watch = LossWatch(runtime.device)
        self.eval_tasks = TrainingEvaluation.for_run(cfg, data, runtime)  # beside the loss
        self.batch = None  # the next training batch, fetched ahead
        self.last_eval_iter: int | None = None
        self.stopped_by: int | None = None  # the signal that stopped the run early, if any
        self.stop = StopSignals()  # replaced by the active one while run() runs
        self.tracker_run_id = cfg.logger.run_id  # the logger's run; a resumed run goes on with its
        if resume is not None:
            self.load_state_dict(resume)
        self.checkpoints = RunCheckpoints(run_dir, dist, resume and self.iter_num)
        plan = RunPlan(cfg.max_iters, cfg.eval_interval, cfg.gradient_accumulation_steps,
                       runtime.device.type, cfg.eval_at_start, tuple(overrides))
        resumed = resume and Resumed(self.iter_num, self.last_eval_iter)
        self.records = RunRecords(run_dir, cfg.logger, self.about.get("config"),
                                  run_id=self.tracker_run_id, plan=plan, resumed=resumed,
                                  best_by=self.objective.best_by)
        self.tracker_run_id = self.records.run_id  # a new run's is the logger's choice

    def run(self) -> float:
        """Train to max_iters, evaluating every eval_interval; return the best val loss (or minus
        the objective's score, objectives.py: lower is better).
        """
        cfg = self.cfg
        self.throughput.restart()
        self.stop = StopSignals(on_abort=lambda: f"during iteration {self.iter_num}; "
                                                 f"{self.checkpoints.describe()}",
                                agree=self.runtime.vote.poll, alone=not self.runtime.dist.enabled)
        with self.stop, self.stop.stopping_early(self.stop_early):
            while True:
                lr = self.set_learning_rate()
                it = self.iter_num
                # A resumed run has already evaluated at the iteration it was saved at.
                due = it % cfg.eval_interval == 0 and (it > 0 or cfg.eval_at_start)
                if (due or it == cfg.max_iters) and it != self.last_eval_iter:
                    self.evaluate()
                if it >= cfg.max_iters:
                    break
                loss = self.train_step()
                self.loss_watch.watch(loss, it)  # on the device; checked where logged or saved
                if it % cfg.log_interval == 0:
                    self.log_progress(loss, lr)
                self.iter_num += 1
                self.stop.stop_here()  # every process of the job stops after the same step
            self.finish()
        return self.best_val_loss

    def set_learning_rate(self) -> float:
        """Set the schedule's rate for this iteration on each parameter group (scaled per group)."""
        lr = learning_rate_at(self.iter_num, self.cfg.optimizer, self.cfg.max_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; their mean loss."""
        if self.batch is None:
            self.batch = self.sampler.get_batch("train")
        total = torch.zeros((), device=self.runtime.device)
        rewind = self.rewind_point()  # until the update, a stop may abandon the step (stops.py)
        for micro_step in range(self.accumulation):  # this process's share of the accumulation
            # Across processes, gradients are averaged once, after the last micro-batch.
            last = micro_step == self.accumulation - 1
            with self.stop.interruptible(rewind), \
                    distributed.maybe_no_sync(self.forward, skip_sync=not last):
                with self.ctx:  # lm's cross-entropy, or DPO's or GRPO's loss (objectives.py)
                    loss = self.objective.loss(self.forward, self.batch) / self.accumulation
                self.batch = self.sampler.get_batch("train")  # fetched while the device works
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
        """Measure the objective (losses, scores) on every process's share, record, checkpoint."""
        self.loss_watch.check(self.checkpoints.describe())
        dist = self.runtime.dist
        eval_iters = -(-self.cfg.eval_iters // dist.world_size)
        with self.stop.interruptible(self.rewind_point()):  # a stop abandons it (stops.py)
            figures = self.objective.evaluate(self.forward, self.sampler, eval_iters, self.ctx,
                                              self.eval_batch_done)  # train_loss, val_loss, ...
            scoring = dist.is_main or self.runtime.sharded  # sharded, every process holds a part
            scores = self.eval_tasks.score(self.model) if scoring else {}
        figures = distributed.all_reduce_mean(figures, dist, self.runtime.device)
        it = self.last_eval_iter = self.iter_num
        for name, value in figures.items():
            check_finite(value, it, f"the {name.replace('_', ' ')}", self.checkpoints.describe())
        tokens = it * self.throughput.tokens_per_iter
        self.records.log({"kind": "eval", "iter": it, "tokens": tokens, **figures, **scores})
        measure = self.objective.held_out(figures)  # best.pt's: the val loss, or minus a score
        improved = measure < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, measure)
        if self.cfg.save_checkpoints:
            self.save_checkpoints(best=improved)
        self.throughput.restart()  # keep evaluation out of ms/iter

    def eval_batch_done(self, done: int, total: int) -> None:
        """Show evaluation's progress; stop it where the whole job agrees to (under torchrun)."""
        self.records.eval_progress(done, total, self.iter_num)
        self.stop.stop_here()

    def log_progress(self, loss: torch.Tensor, lr: float) -> None:
        """Log loss, lr and speed for the latest step (.item() waits for the device: only here)."""
        self.loss_watch.check(self.checkpoints.describe())
        it, dist = self.iter_num, self.runtime.dist
        figures = {"loss": loss.item(), **self.objective.figures()}  # e.g. mean reward, accuracy
        figures = distributed.all_reduce_mean(figures, dist, self.runtime.device)
        tokens = (it + 1) * self.throughput.tokens_per_iter
        self.records.log({"kind": "train", "iter": it, "tokens": tokens, **figures, "lr": lr,
                          **self.throughput.measure(), "grad_norm": self.grad_norm.item()})
        self.throughput.restart()

    def save_checkpoints(self, best: bool) -> None:
        """Write last.pt and, if the model is the best so far, best.pt (on every process)."""
        self.loss_watch.check(self.checkpoints.describe())  # a diverged model is never saved
        self.checkpoints.save(self.state_dict(), best)

    def stop_early(self, signum: int) -> float:
        """After a stop signal: save the last completed step, close everything, say how to go on."""
        self.stopped_by, saved = signum, "save_checkpoints=false: nothing saved"
        if self.cfg.save_checkpoints:
            self.save_checkpoints(best=False)
            saved = self.checkpoints.how_to_resume()
        self.records.close(self.wall_time_s())
        distributed.barrier(self.runtime.dist)  # nobody exits (ending the job) before rank 0 saved
        self.runtime.close()
        if self.runtime.dist.is_main:
            log.warning("stopped by %s before iteration %d: %s", signum.name, self.iter_num, saved)
        return self.best_val_loss

    def finish(self) -> None:
        """Show (and track) a short sample of what the model learned; close the trackers."""
        best = self.objective.describe_best(self.best_val_loss)
        log.info("best %s; run directory %s", best, self.run_dir)
        model = self.runtime.whole(self.model) if self.cfg.sample_tokens > 0 else None
        distributed.barrier(self.runtime.dist)  # ranks tear the job down together, as after a stop
        self.runtime.close()
        try:
            with self.stop.interruptible(alone=True), self.ctx:  # no collectives left to wait for
                if self.cfg.sample_tokens > 0 and self.runtime.dist.is_main:
                    text = sample_text(model, self.data.tokenizer,
                                       self.cfg.sample_tokens, self.runtime.device)
                    log.info("sample:\n%s", text)
                    self.records.log_sample(text)
        except Interrupted as stop:
            self.stopped_by = stop.signum
            log.warning("stopped by %s during the end-of-run sample; training had finished: %s",
                        stop.signum.name, self.checkpoints.describe())
        self.records.close(self.wall_time_s())
