"""Measure speed: ``python -m nanogpt.bench [overrides]``.

Composes the same config as training (so ``model=tiny device=cpu batch_size=12``
mean what they mean there), then times the real training step and generation
with and without the KV cache, after warm-up steps that are not counted.
Writes no checkpoint and logs to no tracker; prints one table and writes it as
JSON. A benchmark, not a test: nothing here asserts on time. ``suite=gpu`` runs
the GPU suite instead (nanogpt/suite.py): several such measurements and a
training run, each in its own process, reported against the PRD's targets.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nanogpt.cli import hydra_entry, to_dataclass
from nanogpt.config import TrainConfig
from nanogpt.options import option, require
from nanogpt.suite import SUITE_RUNS, run_suite
from nanogpt.suite import format_report as format_suite_report
from nanogpt.train import Trainer, build_trainer


@dataclass
class BenchSettings:
    """How much to measure."""

    warmup_steps: int = option(5, "training steps run before timing (compile, allocator, caches)")
    train_steps: int = option(30, "training steps timed")
    gen_tokens: int = option(1000, "new tokens generated per timed generation")
    gen_uncached: bool = option(True, "also time generation without the KV cache")
    output: str = option("bench.json", "written inside the bench's run directory")
    nanogpt_dir: str | None = option(None, "suite=gpu: a karpathy/nanoGPT checkout to run beside ours")
    nanogpt_args: list[str] = option(default_factory=list, help="suite=gpu: more arguments for its train.py")
    suite_runs: list[str] = option(default_factory=lambda: list(SUITE_RUNS),
                                   help="suite=gpu: which of its runs to make (nanogpt needs nanogpt_dir)")

    def __post_init__(self):
        unknown = set(self.suite_runs) - set(SUITE_RUNS)
        require(not unknown, f"bench.suite_runs: {sorted(unknown)} unknown; choose among {list(SUITE_RUNS)}")
        require(self.train_steps >= 1 and self.gen_tokens >= 1 and self.warmup_steps >= 0,
                "train_steps and gen_tokens must be >= 1, warmup_steps >= 0")


@dataclass
class BenchConfig(TrainConfig):
    """A training config plus what to measure."""

    bench: BenchSettings = option(default_factory=BenchSettings)
    suite: str | None = option(None, "gpu: instead of one benchmark, the GPU suite (nanogpt/suite.py)")

    def __post_init__(self):
        super().__post_init__()
        require(self.suite in (None, "gpu"), f"suite={self.suite} is unknown; use suite=gpu or leave it out")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_training(trainer: Trainer, settings: BenchSettings) -> dict:
    """ms/iter, tokens/s, MFU and peak memory of trainer.train_step(), as training measures them."""
    device = trainer.runtime.device
    for _ in range(settings.warmup_steps):
        trainer.train_step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.throughput.restart()
    for _ in range(settings.train_steps):
        loss = trainer.train_step()
    loss.item()
    synchronize(device)
    speed = trainer.throughput.measure()
    return {"train_ms_per_iter": speed["ms_per_iter"], "train_tokens_per_sec": speed["tokens_per_sec"],
            "mfu": speed.get("mfu"), "peak_memory_mb": peak_memory_mb(device)}


def time_generation(trainer: Trainer, new_tokens: int, use_cache: bool) -> dict:
    """Milliseconds per generated token from a one-token prompt, after a short warm-up."""
    model, device = trainer.model, trainer.runtime.device
    model.eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    with trainer.ctx:
        for _ in model.stream(prompt, 8, use_cache=use_cache):
            pass
        synchronize(device)
        start = time.perf_counter()
        for token in model.stream(prompt, new_tokens, top_k=200, use_cache=use_cache):
            token.item()  # a streaming caller needs each token on the host
        seconds = time.perf_counter() - start
    model.train()
    return {"ms_per_token": seconds * 1000 / new_tokens, "tokens_per_sec": new_tokens / seconds}


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory on CUDA; peak resident memory of this process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def describe_machine(device: torch.device) -> dict:
    """Where the figures were taken: device, torch version, threads, commit, date."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, timeout=10,
        ).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_benchmark(cfg: BenchConfig, out_dir: Path) -> dict:
    """Time training and generation as cfg says; return the results (also written as JSON)."""
    settings = cfg.bench
    # A benchmark leaves nothing behind: no checkpoint, no tracker run.
    train_cfg = replace(cfg, save_checkpoints=False, sample_tokens=0, logger=replace(cfg.logger, name="none"))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(train_cfg, Path(scratch))
        results = {
            "machine": describe_machine(trainer.runtime.device),
            "settings": {
                "model": f"{cfg.model.n_layer}/{cfg.model.n_head}/{cfg.model.n_embd}",
                "block_size": cfg.model.block_size,
                "batch_size": cfg.batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "dtype": str(trainer.runtime.dtype).removeprefix("torch."),
                "compile": trainer.runtime.compile,
                "params_m": trainer.model.num_params() / 1e6,
            },
            "train": time_training(trainer, settings),
            "generate_cached": time_generation(trainer, settings.gen_tokens, use_cache=True),
        }
        if settings.gen_uncached:
            results["generate_uncached"] = time_generation(trainer, settings.gen_tokens, use_cache=False)
            results["cache_speedup"] = (
                results["generate_cached"]["tokens_per_sec"] / results["generate_uncached"]["tokens_per_sec"]
            )
        trainer.records.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / settings.output).write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    """The results as a two-column text table."""
    m, s, t = results["machine"], results["settings"], results["train"]
    rows = [
        ("device", m["device"]),
        ("torch / threads", f"{m['torch']} / {m['threads']}"),
        ("model (layers/heads/width)", f"{s['model']}, {s['params_m']:.2f}M params"),
        ("block x batch x accum",
         f"{s['block_size']} x {s['batch_size']} x {s['gradient_accumulation_steps']}"),
        ("dtype / compile", f"{s['dtype']} / {s['compile']}"),
        ("train ms/iter", f"{t['train_ms_per_iter']:.1f}"),
        ("train tokens/s", f"{t['train_tokens_per_sec']:,.0f}"),
        ("MFU", "n/a (peak unknown)" if t["mfu"] is None else f"{t['mfu']:.1%}"),
        ("peak memory MB", f"{t['peak_memory_mb']:,.0f}"),
        ("generate ms/token (KV cache)", f"{results['generate_cached']['ms_per_token']:.2f}"),
        ("generate tokens/s (KV cache)", f"{results['generate_cached']['tokens_per_sec']:,.0f}"),
    ]
    if "generate_uncached" in results:
        rows += [
            ("generate ms/token (no cache)", f"{results['generate_uncached']['ms_per_token']:.2f}"),
            ("generate tokens/s (no cache)", f"{results['generate_uncached']['tokens_per_sec']:,.0f}"),
            ("KV cache speed-up", f"{results['cache_speedup']:.1f}x"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@hydra_entry("bench", schema=BenchConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: compose bench.yaml (train.yaml plus bench settings), measure, print."""
    config = to_dataclass(cfg, BenchConfig)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if config.suite == "gpu":
        report = run_suite(list(HydraConfig.get().overrides.task), out_dir, config.bench.suite_runs,
                           config.bench.nanogpt_dir, config.bench.nanogpt_args, config.dataset.source)
        print(format_suite_report(report))
        print(f"written to {out_dir / 'suite.md'} and suite.json", file=sys.stderr)
        return
    results = run_benchmark(config, out_dir)
    print(format_table(results))
    print(f"written to {out_dir / config.bench.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
