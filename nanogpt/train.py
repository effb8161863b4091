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
from nanogpt.tracking import MetricsLog

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


def train(cfg: TrainConfig, run_dir: Path, resolved_config: dict | None = None) -> float:
    """Train a GPT as cfg says, writing into run_dir; return the best validation loss."""
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device.name)
    dtype = resolve_dtype(cfg.device.dtype, device)
    ctx = autocast(device, dtype)

    data = prepare_data(
        cfg.dataset.name,
        cfg.dataset.source,
        Path(cfg.data_root),
        sha256=cfg.dataset.sha256,
        val_fraction=cfg.dataset.val_fraction,
    )
    sampler = BatchSampler(data, cfg.model.block_size, cfg.batch_size, device, seed=cfg.seed)
    log.info(
        "data: %s in %s, vocab %d, %d train / %d val tokens",
        cfg.dataset.name, data.directory, data.vocab_size, data.meta["train_tokens"], data.meta["val_tokens"],
    )

    model_config = GPTConfig(vocab_size=data.vocab_size, **asdict(cfg.model))
    model = GPT(model_config).to(device)
    n_params = model.num_params()
    log.info("model: %.2fM parameters, %s", n_params / 1e6, model_config)
    o = cfg.optimizer
    optimizer = configure_optimizer(model, o.weight_decay, o.lr, (o.beta1, o.beta2), o.eps)
    # Loss scaling keeps fp16 gradients from underflowing; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    compiled = should_compile(cfg.device.compile, device)
    forward = torch.compile(model) if compiled else model
    log.info("device: %s, dtype %s, compile %s", device, str(dtype).removeprefix("torch."), compiled)

    tokens_per_iter = cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps
    peak = peak_flops(device, cfg.device.peak_flops)
    metrics = MetricsLog(run_dir)
    checkpoint_base = {
        "model_config": asdict(model_config),
        "tokenizer": data.meta["tokenizer"],
        "config": resolved_config or {},
    }
    best_val_loss = float("inf")

    x, y = sampler.get_batch("train")
    timer_start, timer_iters = time.perf_counter(), 0
    for it in range(cfg.max_iters + 1):
        lr = learning_rate_at(it, o, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            losses = estimate_loss(forward, sampler, cfg.eval_iters, ctx)
            log.info("eval %d: train loss %.4f, val loss %.4f", it, losses["train"], losses["val"])
            metrics.log({"kind": "eval", "iter": it, "tokens": it * tokens_per_iter,
                         "train_loss": losses["train"], "val_loss": losses["val"]})
            if cfg.save_checkpoints:
                state = {**checkpoint_base, "model": model_state(model), "iter_num": it,
                         "best_val_loss": min(best_val_loss, losses["val"])}
                if losses["val"] < best_val_loss:
                    save_checkpoint(run_dir / BEST, state)
                save_checkpoint(run_dir / LAST, {**state, "optimizer": optimizer.state_dict()})
            best_val_loss = min(best_val_loss, losses["val"])
            timer_start, timer_iters = time.perf_counter(), 0  # keep evaluation out of ms/iter
        if it == cfg.max_iters:
            break

        for _ in range(cfg.gradient_accumulation_steps):
            with ctx:
                _, loss = forward(x, y)
                loss = loss / cfg.gradient_accumulation_steps
            x, y = sampler.get_batch("train")  # fetch the next batch while the device works
            scaler.scale(loss).backward()
        if o.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        timer_iters += 1

        if it % cfg.log_interval == 0:
            train_loss = loss.item() * cfg.gradient_accumulation_steps  # .item() waits for the device
            seconds = (time.perf_counter() - timer_start) / timer_iters
            tokens_per_sec = tokens_per_iter / seconds
            record = {"kind": "train", "iter": it, "tokens": (it + 1) * tokens_per_iter,
                      "loss": train_loss, "lr": lr, "ms_per_iter": seconds * 1000,
                      "tokens_per_sec": tokens_per_sec}
            line = (f"iter {it}: loss {train_loss:.4f}, lr {lr:.2e}, {seconds * 1000:.1f} ms/iter, "
                    f"{tokens_per_sec:,.0f} tok/s")
            if peak:
                record["mfu"] = estimate_mfu(model_config, n_params, tokens_per_sec, peak)
                line += f", mfu {record['mfu']:.1%}"
            log.info(line)
            metrics.log(record)
            timer_start, timer_iters = time.perf_counter(), 0

    metrics.close()
    log.info("best val loss %.4f; run directory %s", best_val_loss, run_dir)
    if cfg.sample_tokens > 0:
        log.info("sample:\n%s", sample_text(model, data, cfg.sample_tokens, device))
    return best_val_loss


@hydra_entry("train")
def main(cfg: DictConfig) -> float:
    """Entry point: compose the config, validate it, train in Hydra's run directory."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = to_dataclass(cfg, TrainConfig)
        validate_train_config(config)
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
