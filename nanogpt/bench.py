"""Measure speed: ``python -m nanogpt.bench [overrides]``.

Composes the same config as training (so ``model=tiny device=cpu batch_size=12``
mean what they mean there), then times the real training step and generation
with and without the KV cache, after warm-up steps that are not counted.
Writes no checkpoint and logs to no tracker; prints one table and writes it as
JSON. A benchmark, not a test: nothing here asserts on time. ``suite=gpu`` runs
the GPU suite instead (nanogpt/benchmarks/suite.py): several such measurements and a
training run, each in its own process, reported against the project's GPU targets.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nanogpt.benchmarks.suite import RUNS, SUITE_KEYS, SUITE_RUNS, run_suite
from nanogpt.benchmarks.suite import format_report as format_suite_report
from nanogpt.benchmarks.timing import (
    describe_machine,
    format_table,
    generation_step,
    greedy_agreement,
    time_generation,
    time_training,
)
from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.cli.overrides import merge_overrides, parse_overrides
from nanogpt.options import option, require
from nanogpt.runtime.device import should_compile
from nanogpt.training.config import TrainConfig
from nanogpt.training.setup import build_trainer


@dataclass
class BenchSettings:
    """How much to measure."""

    warmup_steps: int = option(5, "training steps run before timing (compile, allocator, caches)")
    train_steps: int = option(30, "training steps timed")
    gen_tokens: int = option(1000, "new tokens generated per timed generation")
    gen_uncached: bool = option(True, "also time generation without the KV cache")
    gen_rows: int = option(1, "also time this many sequences decoded together (1: only one)")
    gen_compiled: bool = option(False, "also time generation through the compiled one-token step (as CUDA "
                                       "graphs on a GPU unless device.cuda_graphs=false), and check that its "
                                       "greedy tokens are eager's")
    output: str = option("bench.json", "a file name, written inside the bench's run directory (which must be "
                                       "new or empty)")
    nanogpt_dir: str | None = option(None, "suite=gpu: a karpathy/nanoGPT checkout to run beside ours")
    nanogpt_args: list[str] = option(default_factory=list, help="suite=gpu: more arguments for its train.py")
    suite_runs: list[str] = option(default_factory=lambda: list(SUITE_RUNS),
                                   help="suite=gpu: which of its runs to make (nanogpt needs nanogpt_dir)")

    def __post_init__(self):
        unknown = set(self.suite_runs) - set(SUITE_RUNS)
        require(not unknown, f"bench.suite_runs: {sorted(unknown)} unknown; choose among {list(SUITE_RUNS)}")
        require(self.train_steps >= 1 and self.gen_tokens >= 1 and self.warmup_steps >= 0,
                "train_steps and gen_tokens must be >= 1, warmup_steps >= 0")
        require(self.gen_rows >= 1, f"bench.gen_rows={self.gen_rows} must be at least 1")
        # The bench's own (new) directory holds it: a path elsewhere could name a file of the user's.
        require(Path(self.output).name == self.output and self.output not in ("", ".", ".."),
                f"output={self.output} must be a file name, which the bench writes in its run directory "
                "(choose where that is with hydra.run.dir=NEW)")


@dataclass
class BenchConfig(TrainConfig):
    """A training config plus what to measure."""

    bench: BenchSettings = option(default_factory=BenchSettings)
    suite: str | None = option(None, "gpu: instead of one benchmark, the GPU suite "
                                     "(nanogpt/benchmarks/suite.py)")

    def __post_init__(self):
        super().__post_init__()
        require(self.suite in (None, "gpu"), f"suite={self.suite} is unknown; use suite=gpu or leave it out")


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
                "trainable_params_m": sum(p.numel() for p in trainer.model.parameters()
                                          if p.requires_grad) / 1e6,
            },
            "train": time_training(trainer, settings.warmup_steps, settings.train_steps),
        }
        # Generation as sampling runs it: compiled only where device.compile=true says so.
        device = trainer.runtime.device
        step = generation_step(trainer, should_compile(cfg.device.compile, device, generating=True))
        results["generate_cached"] = time_generation(trainer, settings.gen_tokens, True, step=step)
        if settings.gen_compiled:
            candidate = generation_step(trainer, compiled=True)
            results["generate_compiled"] = {
                **time_generation(trainer, settings.gen_tokens, True, step=candidate),
                "greedy": greedy_agreement(trainer, candidate)}
        if settings.gen_rows > 1:
            rows = time_generation(trainer, settings.gen_tokens, True, rows=settings.gen_rows, step=step)
            results["generate_rows"] = {**rows, "time_vs_one": rows["ms_per_token"]
                                        / results["generate_cached"]["ms_per_token"]}
        if settings.gen_uncached:
            results["generate_uncached"] = time_generation(trainer, settings.gen_tokens, use_cache=False)
            results["cache_speedup"] = (
                results["generate_cached"]["tokens_per_sec"] / results["generate_uncached"]["tokens_per_sec"]
            )
        trainer.records.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / settings.output).write_text(json.dumps(results, indent=2))
    return results


def suite_commands(given: list[str], names: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Each of our suite runs as (module, overrides): its own, with the suite's command line laid over them.

    Keys only the suite reads are not passed on, and bench.* settings reach only benchmark runs.
    """
    commands = {}
    for name, (module, own) in RUNS.items():
        if name not in names:
            continue
        passed = [o.input_line for o in parse_overrides(given)
                  if not o.key_or_group.startswith(SUITE_KEYS)
                  and (module == "nanogpt.bench" or not o.key_or_group.startswith("bench."))]
        commands[name] = (module, merge_overrides(own, passed))
    return commands


@hydra_entry("bench", BenchConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: compose bench.yaml (train.yaml plus bench settings), measure, print."""
    config = to_dataclass(cfg, BenchConfig)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if config.suite == "gpu":
        commands = suite_commands(list(HydraConfig.get().overrides.task), config.bench.suite_runs)
        report = run_suite(commands, out_dir, config.bench.suite_runs, config.bench.nanogpt_dir,
                           config.bench.nanogpt_args, config.dataset.source)
        print(format_suite_report(report))
        print(f"written to {out_dir / 'suite.md'} and suite.json", file=sys.stderr)
        return
    results = run_benchmark(config, out_dir)
    print(format_table(results))
    print(f"written to {out_dir / config.bench.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
