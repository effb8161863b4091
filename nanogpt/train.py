"""Train a GPT: ``python -m nanogpt.train [overrides]``.

main() is the only place that sees Hydra: it turns the composed config into a
TrainConfig and calls train(), a plain function of that config and a run
directory. Everything the run makes lands in the run directory: the resolved
config, the log, metrics.jsonl and the checkpoints best.pt and last.pt.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanogpt import distributed, faults, resume
from nanogpt.checkpoint import BEST, LAST, model_state, save_checkpoint
from nanogpt.cli import hydra_entry, to_dataclass
from nanogpt.config import OptimizerConfig, TrainConfig, validate_train_config
from nanogpt.data import BatchSampler, PreparedData, UnknownTokenError, prepare_dataset, tokenizer_codec
from nanogpt.device import autocast, peak_flops, resolve_device, resolve_dtype, should_compile
from nanogpt.errors import ConfigError, UserError
from nanogpt.hf import load_gpt2_weights
from nanogpt.model import GPT, GPTConfig, configure_optimizer, estimate_mfu
from nanogpt.optim import configure_muon
from nanogpt.progress import TrainingProgress
from nanogpt.sweeps import name_tracking_run
from nanogpt.tracking import RunTracking

log = logging.getLogger("nanogpt.train")


def learning_rate_at(it: int, opt: OptimizerConfig, max_iters: int) -> float:
    """Linear warmup to opt.lr, then cosine decay to opt.min_lr at lr_decay_iters, then flat."""
    if not opt.decay_lr:
        return opt.lr
    decay_iters = opt.lr_decay_iters or max_iters
    if it < opt.warmup_iters:
        return opt.lr * (it + 1) / (opt.warmup_iters + 1)
    if it >= decay_iters:
        return opt.min_lr
    progress = (it - opt.warmup_iters) / (decay_iters - opt.warmup_iters)
    return opt.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (opt.lr - opt.min_lr)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def sample_text(model: GPT, data: PreparedData, num_tokens: int, device: torch.device) -> str:
    """A short greedy-free sample (temperature 1, top_k 200) starting from a newline."""
    encode, decode = tokenizer_codec(data.meta["tokenizer"])
    try:
        start = encode("\n")
    except UnknownTokenError:  # a character vocabulary without newlines
        start = [0]
    idx = torch.tensor([start], dtype=torch.long, device=device)
    model.eval()
    ids = [int(t) for t in model.generate(idx, num_tokens, temperature=1.0, top_k=200)]
    return decode(start + ids)


class Trainer:
    """One training run: the model, its optimizer, its data and its run directory.

    run() is the loop; each of its parts (evaluate, train_step, log_progress,
    save_checkpoints) is a method of its own so it can be read, and changed, alone.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, resolved_config: dict | None = None,
                 resume_state: dict | None = None, overrides: list[str] | None = None):
        self.cfg = cfg
        self.resume_state = resume_state
        self.overrides = list(overrides or [])
        self.run_dir = run_dir
        # Under torchrun (or a SLURM job) several processes train together; rank 0 writes.
        self.dist = distributed.context_from_environment()
        self.owns_process_group = distributed.init_process_group(self.dist)
        distributed.silence_other_ranks(self.dist)
        self.accumulation = distributed.per_rank_accumulation(cfg.gradient_accumulation_steps, self.dist)
        run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.device = distributed.device_for(self.dist, resolve_device(cfg.device.name))
        self.dtype = resolve_dtype(cfg.device.dtype, self.device)
        self.ctx = autocast(self.device, self.dtype)

        self.data = prepare_dataset(cfg.dataset, Path(cfg.data_root))
        # Every rank draws the same global batch from the same seed and keeps its own share.
        self.sampler = BatchSampler(self.data, cfg.model.block_size, cfg.batch_size, self.device, cfg.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        meta = self.data.meta
        log.info(
            "data: %s in %s, vocab %d, %d train / %d val tokens",
            cfg.dataset.name, self.data.directory, meta["vocab_size"],
            meta["train_tokens"], meta["val_tokens"],
        )

        self.model = self.build_model().to(self.device)
        self.model_config = self.model.config
        self.n_params = self.model.num_params()
        log.info("model: %.2fM parameters, %s", self.n_params / 1e6, self.model_config)
        o = cfg.optimizer
        if o.name == "muon":
            self.optimizer = configure_muon(
                self.model, o.lr, o.muon_lr, o.weight_decay, (o.beta1, o.beta2), o.eps, o.muon_momentum
            )
        else:
            self.optimizer = configure_optimizer(self.model, o.weight_decay, o.lr, (o.beta1, o.beta2), o.eps)
        # Loss scaling keeps fp16 gradients from underflowing; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        compiled = should_compile(cfg.device.compile, self.device)
        self.forward = self.model
        if self.dist.enabled:
            # The same weights everywhere (DDP also broadcasts rank 0's), different dropout masks.
            torch.manual_seed(cfg.seed + self.dist.rank)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if compiled:
            self.forward = torch.compile(self.forward)
        log.info("device: %s, dtype %s, compile %s",
                 self.device, str(self.dtype).removeprefix("torch."), compiled)

        self.tokens_per_iter = cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps
        self.peak_flops = peak_flops(self.device, cfg.device.peak_flops)
        self.resolved_config = resolved_config or {}
        if resume_state is not None and cfg.logger.run_id is None:
            # Continue the same tracker run (W&B resumes by id) rather than starting another.
            cfg.logger.run_id = resume_state.get("training", {}).get("tracker_run_id")
        self.metrics = RunTracking(run_dir, cfg.logger, self.resolved_config)
        self.tracker_run_id = self.metrics.run_id
        self.progress = TrainingProgress(cfg.max_iters, enabled=self.metrics.owner)
        self.grad_norm = torch.zeros(())
        self.iter_num = 0
        self.best_val_loss = float("inf")
        self.batch = None  # the next training batch, fetched ahead
        self.last_eval_iter: int | None = None
        self.last_saved_iter: int | None = None
        self.stopped_by: int | None = None  # the signal that stopped the run early, if any
        if resume_state is not None:
            self.restore(resume_state)

    @property
    def ddp_module(self) -> torch.nn.Module:
        """The DistributedDataParallel wrapper (under torch.compile, if any), else the model."""
        return getattr(self.forward, "_orig_mod", self.forward)

    def build_model(self) -> GPT:
        """A fresh GPT of the configured shape, or one loaded from pretrained GPT-2 weights."""
        m = self.cfg.model
        if m.init_from is None:
            shape = {k: v for k, v in asdict(m).items() if k != "init_from"}
            return GPT(GPTConfig(vocab_size=self.data.vocab_size, **shape))
        model, tokenizer = load_gpt2_weights(
            m.init_from, block_size=m.block_size, dropout=m.dropout,
            vocab_multiple=m.vocab_multiple, gradient_checkpointing=m.gradient_checkpointing,
        )
        if tokenizer != self.data.meta["tokenizer"]:
            raise ConfigError(
                f"model.init_from={m.init_from} was trained with tokenizer {tokenizer.get('kind')}, "
                f"but dataset {self.cfg.dataset.name} uses {self.data.meta['tokenizer'].get('kind')}; "
                "pick a dataset with the same tokenizer (e.g. dataset=shakespeare for GPT-2)"
            )
        log.info("model: initialised from %s (shape taken from the weights)", m.init_from)
        return model

    def run(self) -> float:
        """Train to max_iters, evaluating every eval_interval; return the best validation loss."""
        cfg = self.cfg
        if self.batch is None:
            self.batch = self.sampler.get_batch("train")
        self.restart_timer()
        with resume.StopSignals() as stop:
            try:
                while True:
                    it = self.iter_num
                    lr = learning_rate_at(it, cfg.optimizer, cfg.max_iters)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    # A resumed run has already evaluated at the iteration it was saved at.
                    if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != self.last_eval_iter:
                        self.evaluate()
                    if it >= cfg.max_iters:
                        break
                    faults.before_step(it)
                    loss = self.train_step()
                    # One host sync per step: a NaN must stop the run before anything saves it.
                    resume.check_finite(loss.item(), it, "the training loss", self.describe_last_checkpoint())
                    if it % cfg.log_interval == 0:
                        self.log_progress(loss, lr)
                    self.iter_num += 1
                    if stop.received is not None:
                        self.stop_early(stop.received)
                        return self.best_val_loss
            except KeyboardInterrupt:
                log.error("aborted at once during iteration %d; %s",
                          self.iter_num, self.describe_last_checkpoint())
                raise SystemExit(128 + signal.SIGINT) from None
        self.finish()
        return self.best_val_loss

    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns their mean loss."""
        cfg = self.cfg
        accumulation = self.accumulation  # this process's share of gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for micro_step in range(accumulation):
            x, y = self.batch
            # Across processes, gradients are averaged once, after the last micro-batch.
            with distributed.maybe_no_sync(self.ddp_module, skip_sync=micro_step < accumulation - 1):
                with self.ctx:
                    _, loss = self.forward(x, y)
                    loss = faults.poison_loss(loss, self.iter_num) / accumulation
                self.batch = self.sampler.get_batch("train")  # fetch the next batch while the device works
                self.scaler.scale(loss).backward()
            total += loss.detach()
        # The norm is tracked even without clipping (an infinite limit clips nothing).
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.timer_iters += 1
        return total  # the mean loss over this process's micro-batches

    def evaluate(self) -> dict:
        """Estimate train and val loss, record them, and checkpoint."""
        # Each process evaluates its share of the batches; the mean is over all of them.
        eval_iters = -(-self.cfg.eval_iters // self.dist.world_size)
        losses = estimate_loss(self.forward, self.sampler, eval_iters, self.ctx)
        losses = distributed.all_reduce_mean(losses, self.dist, self.device)
        it = self.iter_num
        self.last_eval_iter = it
        for split in ("train", "val"):
            resume.check_finite(losses[split], it, f"the {split} loss", self.describe_last_checkpoint())
        log.info("eval %d: train loss %.4f, val loss %.4f", it, losses["train"], losses["val"])
        self.metrics.log({"kind": "eval", "iter": it, "tokens": it * self.tokens_per_iter,
                          "train_loss": losses["train"], "val_loss": losses["val"]})
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if self.cfg.save_checkpoints and self.dist.is_main:
            self.save_checkpoints(best=improved)
        self.restart_timer()  # keep evaluation out of ms/iter
        return losses

    def checkpoint_state(self) -> dict:
        """Everything sampling needs: model shape and weights, tokenizer, progress, config."""
        return {
            "model_config": asdict(self.model_config),
            "model": model_state(self.model),
            "tokenizer": self.data.meta["tokenizer"],
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "config": self.resolved_config,
        }

    def save_checkpoints(self, best: bool) -> None:
        """Write last.pt (with everything resuming needs) and, if best, best.pt."""
        state = self.checkpoint_state()
        if best:
            save_checkpoint(self.run_dir / BEST, state)
        save_checkpoint(self.run_dir / LAST, {**state, "optimizer": self.optimizer.state_dict(),
                                              "training": self.training_state()})
        self.last_saved_iter = self.iter_num

    def training_state(self) -> dict:
        """What resuming needs beyond weights and optimizer: RNGs, next batch, progress markers."""
        return {
            "scaler": self.scaler.state_dict(),
            "rng": resume.capture_rng_state(),
            "sampler_rng": self.sampler.generator.get_state(),
            "eval_sampler_rng": self.sampler.eval_generator.get_state(),
            "batch": [t.cpu() for t in self.batch] if self.batch is not None else None,
            "last_eval_iter": self.last_eval_iter,
            "overrides": self.overrides,
            "tracker_run_id": self.tracker_run_id,
        }

    def restore(self, state: dict) -> None:
        """Continue from a last.pt exactly where its run was when it was saved."""
        training = state["training"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(training["scaler"])
        self.iter_num = state["iter_num"]
        self.best_val_loss = state["best_val_loss"]
        self.last_eval_iter = training["last_eval_iter"]
        self.last_saved_iter = self.iter_num
        self.sampler.generator.set_state(training["sampler_rng"])
        self.sampler.eval_generator.set_state(training["eval_sampler_rng"])
        if training["batch"] is not None:
            self.batch = tuple(t.to(self.device) for t in training["batch"])
        resume.restore_rng_state(training["rng"])
        for stale in resume.iter_stale_temporaries(self.run_dir):
            log.info("removing %s, left by a process killed while saving", stale.name)
            stale.unlink(missing_ok=True)

    def describe_last_checkpoint(self) -> str:
        """Where the newest good checkpoint is, for messages about stopping."""
        if self.last_saved_iter is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is {self.run_dir / LAST} (iteration {self.last_saved_iter})"

    def stop_early(self, signum: int) -> None:
        """After a stop signal: checkpoint this step, close everything, say how to resume."""
        self.stopped_by = signum
        if self.cfg.save_checkpoints:
            self.save_checkpoints(best=False)
        self.finish()
        name = signal.Signals(signum).name
        if self.cfg.save_checkpoints:
            log.warning("stopped by %s after iteration %d; checkpoint saved to %s\n"
                        "resume with: python -m nanogpt.train resume=%s",
                        name, self.iter_num - 1, self.run_dir / LAST, self.run_dir)
        else:
            log.warning("stopped by %s after iteration %d; save_checkpoints=false, so nothing was saved "
                        "to resume from", name, self.iter_num - 1)

    def restart_timer(self) -> None:
        """Start measuring ms/iter afresh."""
        self.timer_start, self.timer_iters = time.perf_counter(), 0

    def log_progress(self, loss: torch.Tensor, lr: float) -> None:
        """Log loss, lr, speed (and MFU where the device's peak is known) for the latest step."""
        it = self.iter_num
        # .item() waits for the device: only once per log_interval. Every rank takes part.
        train_loss = distributed.all_reduce_mean({"loss": loss.item()}, self.dist, self.device)["loss"]
        seconds = (time.perf_counter() - self.timer_start) / max(self.timer_iters, 1)
        tokens_per_sec = self.tokens_per_iter / seconds
        record = {"kind": "train", "iter": it, "tokens": (it + 1) * self.tokens_per_iter,
                  "loss": train_loss, "lr": lr, "ms_per_iter": seconds * 1000,
                  "tokens_per_sec": tokens_per_sec, "grad_norm": self.grad_norm.item()}
        line = (f"iter {it}: loss {train_loss:.4f}, lr {lr:.2e}, {seconds * 1000:.1f} ms/iter, "
                f"{tokens_per_sec:,.0f} tok/s")
        if self.peak_flops:
            record["mfu"] = estimate_mfu(self.model_config, self.n_params, tokens_per_sec, self.peak_flops)
            line += f", mfu {record['mfu']:.1%}"
        log.info(line)
        self.metrics.log(record)
        self.progress.update_to(it + 1, train_loss)
        self.restart_timer()

    def finish(self) -> None:
        """Show (and track) a short sample of what the model learned; close the trackers."""
        self.progress.close()
        log.info("best val loss %.4f; run directory %s", self.best_val_loss, self.run_dir)
        if self.owns_process_group:
            torch.distributed.destroy_process_group()
        if self.cfg.sample_tokens > 0 and self.stopped_by is None and self.dist.is_main:
            text = sample_text(self.model, self.data, self.cfg.sample_tokens, self.device)
            log.info("sample:\n%s", text)
            self.metrics.log_sample(text)
        self.metrics.close()


def train(cfg: TrainConfig, run_dir: Path, resolved_config: dict | None = None,
          resume_state: dict | None = None) -> float:
    """Train a GPT as cfg says, writing into run_dir; return the best validation loss."""
    return Trainer(cfg, run_dir, resolved_config, resume_state).run()


@hydra_entry("train", rewrite_arguments=resume.resume_arguments)
def train_task(cfg: DictConfig) -> float:
    """Compose the config, validate it, train (or resume) in Hydra's run directory."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    distributed.announce_run_dir(run_dir)  # under torchrun, the other ranks use rank 0's directory
    is_main = distributed.context_from_environment().is_main
    try:
        config = to_dataclass(cfg, TrainConfig)
        validate_train_config(config)
        config.logger = name_tracking_run(config.logger)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resume_state = resume.checkpoint_to_resume(config.resume, config.auto_resume, run_dir, resolved)
        if is_main:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        overrides = list(HydraConfig.get().overrides.task)
        trainer = Trainer(config, run_dir, resolved, resume_state, overrides)
        best_val_loss = trainer.run()
        if trainer.stopped_by is not None:
            sys.exit(128 + trainer.stopped_by)  # the shell's convention for "ended by a signal"
        return best_val_loss
    except (UserError, OmegaConfBaseException):
        # Nothing was trained yet: leave no half-made run directory behind.
        if is_main and not any(run_dir.glob("*.pt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def main() -> None:
    """Entry point: ``python -m nanogpt.train`` or ``torchrun ... -m nanogpt.train``."""
    distributed.run_with_shared_run_dir(train_task)


if __name__ == "__main__":
    # Run the copy of this module that is importable as nanogpt.train, not __main__, so that
    # launchers which pickle the task (joblib, submitit) can refer to it by name.
    from nanogpt.train import main as importable_main

    importable_main()
