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
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanogpt.checkpoint import BEST, LAST, model_state, save_checkpoint
from nanogpt.cli import hydra_entry, to_dataclass
from nanogpt.config import OptimizerConfig, TrainConfig, validate_train_config
from nanogpt.data import BatchSampler, PreparedData, create_encoder_decoder, prepare_data
from nanogpt.device import autocast, peak_flops, resolve_device, resolve_dtype, should_compile
from nanogpt.errors import UserError
from nanogpt.model import GPT, GPTConfig, configure_optimizer, estimate_mfu
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
            x, y = sampler.get_batch(split)
            with ctx:
                _, loss = model(x, y)
            total += loss.float()
        losses[split] = (total / eval_iters).item()
    model.train()
    return losses


def sample_text(model: GPT, data: PreparedData, num_tokens: int, device: torch.device) -> str:
    """A short greedy-free sample (temperature 1, top_k 200) starting from a newline."""
    vocabulary = data.meta["tokenizer"]["vocabulary"]
    encode, decode = create_encoder_decoder(vocabulary)
    start = encode("\n") if "\n" in vocabulary else [0]
    idx = torch.tensor([start], dtype=torch.long, device=device)
    model.eval()
    ids = [int(t) for t in model.generate(idx, num_tokens, temperature=1.0, top_k=200)]
    return decode(start + ids)


class Trainer:
    """One training run: the model, its optimizer, its data and its run directory.

    run() is the loop; each of its parts (evaluate, train_step, log_progress,
    save_checkpoints) is a method of its own so it can be read, and changed, alone.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path, resolved_config: dict | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device.name)
        self.dtype = resolve_dtype(cfg.device.dtype, self.device)
        self.ctx = autocast(self.device, self.dtype)

        self.data = prepare_data(
            cfg.dataset.name,
            cfg.dataset.source,
            Path(cfg.data_root),
            sha256=cfg.dataset.sha256,
            val_fraction=cfg.dataset.val_fraction,
        )
        self.sampler = BatchSampler(self.data, cfg.model.block_size, cfg.batch_size, self.device, cfg.seed)
        meta = self.data.meta
        log.info(
            "data: %s in %s, vocab %d, %d train / %d val tokens",
            cfg.dataset.name, self.data.directory, meta["vocab_size"],
            meta["train_tokens"], meta["val_tokens"],
        )

        self.model_config = GPTConfig(vocab_size=self.data.vocab_size, **asdict(cfg.model))
        self.model = GPT(self.model_config).to(self.device)
        self.n_params = self.model.num_params()
        log.info("model: %.2fM parameters, %s", self.n_params / 1e6, self.model_config)
        o = cfg.optimizer
        self.optimizer = configure_optimizer(self.model, o.weight_decay, o.lr, (o.beta1, o.beta2), o.eps)
        # Loss scaling keeps fp16 gradients from underflowing; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        compiled = should_compile(cfg.device.compile, self.device)
        self.forward = torch.compile(self.model) if compiled else self.model
        log.info("device: %s, dtype %s, compile %s",
                 self.device, str(self.dtype).removeprefix("torch."), compiled)

        self.tokens_per_iter = cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps
        self.peak_flops = peak_flops(self.device, cfg.device.peak_flops)
        self.resolved_config = resolved_config or {}
        self.metrics = RunTracking(run_dir, cfg.logger, self.resolved_config)
        self.progress = TrainingProgress(cfg.max_iters, enabled=self.metrics.owner)
        self.grad_norm = torch.zeros(())
        self.iter_num = 0
        self.best_val_loss = float("inf")

    def run(self) -> float:
        """Train to max_iters, evaluating every eval_interval; return the best validation loss."""
        cfg = self.cfg
        self.batch = self.sampler.get_batch("train")
        self.restart_timer()
        while True:
            it = self.iter_num
            lr = learning_rate_at(it, cfg.optimizer, cfg.max_iters)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                self.evaluate()
            if it >= cfg.max_iters:
                break
            loss = self.train_step()
            if it % cfg.log_interval == 0:
                self.log_progress(loss, lr)
            self.iter_num += 1
        self.finish()
        return self.best_val_loss

    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the last loss."""
        cfg = self.cfg
        accumulation = cfg.gradient_accumulation_steps
        for _ in range(accumulation):
            x, y = self.batch
            with self.ctx:
                _, loss = self.forward(x, y)
                loss = loss / accumulation
            self.batch = self.sampler.get_batch("train")  # fetch the next batch while the device works
            self.scaler.scale(loss).backward()
        # The norm is tracked even without clipping (an infinite limit clips nothing).
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.timer_iters += 1
        return loss * accumulation

    def evaluate(self) -> dict:
        """Estimate train and val loss, record them, and checkpoint."""
        losses = estimate_loss(self.forward, self.sampler, self.cfg.eval_iters, self.ctx)
        it = self.iter_num
        log.info("eval %d: train loss %.4f, val loss %.4f", it, losses["train"], losses["val"])
        self.metrics.log({"kind": "eval", "iter": it, "tokens": it * self.tokens_per_iter,
                          "train_loss": losses["train"], "val_loss": losses["val"]})
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if self.cfg.save_checkpoints:
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
        """Write last.pt (with optimizer state, for resuming) and, if best, best.pt."""
        state = self.checkpoint_state()
        if best:
            save_checkpoint(self.run_dir / BEST, state)
        save_checkpoint(self.run_dir / LAST, {**state, "optimizer": self.optimizer.state_dict()})

    def restart_timer(self) -> None:
        """Start measuring ms/iter afresh."""
        self.timer_start, self.timer_iters = time.perf_counter(), 0

    def log_progress(self, loss: torch.Tensor, lr: float) -> None:
        """Log loss, lr, speed (and MFU where the device's peak is known) for the latest step."""
        it = self.iter_num
        train_loss = loss.item()  # .item() waits for the device: only once per log_interval
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
        if self.cfg.sample_tokens > 0:
            text = sample_text(self.model, self.data, self.cfg.sample_tokens, self.device)
            log.info("sample:\n%s", text)
            self.metrics.log_sample(text)
        self.metrics.close()


def train(cfg: TrainConfig, run_dir: Path, resolved_config: dict | None = None) -> float:
    """Train a GPT as cfg says, writing into run_dir; return the best validation loss."""
    return Trainer(cfg, run_dir, resolved_config).run()


@hydra_entry("train")
def main(cfg: DictConfig) -> float:
    """Entry point: compose the config, validate it, train in Hydra's run directory."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = to_dataclass(cfg, TrainConfig)
        validate_train_config(config)
        config.logger = name_tracking_run(config.logger)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        return train(config, run_dir, resolved)
    except (UserError, OmegaConfBaseException):
        # Nothing was trained yet: leave no half-made run directory behind.
        if not any(run_dir.glob("*.pt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

if __name__ == "__main__":
    main()
