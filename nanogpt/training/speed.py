"""How fast training runs: ms/iter, tokens/s and model FLOPs utilisation (MFU).

Training logs these figures every log_interval and the benchmark reports them;
both measure through Throughput, so the two always agree on what they mean.
"""

from __future__ import annotations

import time

from nanogpt.model import GPT, GPTConfig
from nanogpt.training.config import TrainConfig


def flops_per_token(config: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B."""
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_size * config.block_size


class Throughput:
    """Times optimizer steps since the last restart()."""

    def __init__(self, tokens_per_iter: int, flops_per_token: float, peak_flops: float | None):
        self.tokens_per_iter = tokens_per_iter
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.restart()

    @classmethod
    def of_run(cls, cfg: TrainConfig, model: GPT, peak_flops: float | None) -> Throughput:
        """Timing for a run's steps: its tokens per step, the model's FLOPs per token."""
        tokens_per_iter = cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps
        return cls(tokens_per_iter, flops_per_token(model.config, model.num_params()), peak_flops)

    def restart(self) -> None:
        """Start timing afresh (after an evaluation, or a benchmark's warm-up)."""
        self.start, self.steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self.steps += 1

    def measure(self) -> dict:
        """ms_per_iter, tokens_per_sec and, where the peak is known, mfu, over the steps counted."""
        seconds = (time.perf_counter() - self.start) / max(self.steps, 1)
        figures = {"ms_per_iter": seconds * 1000, "tokens_per_sec": self.tokens_per_iter / seconds}
        if self.peak_flops:
            figures["mfu"] = self.flops_per_token * figures["tokens_per_sec"] / self.peak_flops
        return figures
