"""Telling a first run the truth early: how long it will take on this device, and a quicker recipe if long."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from nanogpt.runtime.distributed import context_from_environment

log = logging.getLogger("nanogpt.tracking")


# A first run that will take longer than this on its device is told so, with a quicker recipe.
LONG_RUN_S = 15 * 60
QUICKER_RECIPES = {"cpu": "+experiment=shakespeare_char_cpu", "mps": "+experiment=shakespeare_char_cpu"}


@dataclass
class RunPlan:
    """What a run will do, for the duration forecast: steps, evaluations, work per step, device."""

    max_iters: int
    eval_interval: int
    micro_batches: int  # forward/backward passes per step, all processes together
    device: str

    def forecast(self, seconds_per_eval_batch: float, eval_batches: int) -> tuple[float, float]:
        """(whole run, one evaluation) in seconds, from the time of one evaluation batch.

        A training micro-batch (forward and backward) costs about three forward passes.
        """
        evals = self.max_iters // self.eval_interval + 1 + (self.max_iters % self.eval_interval > 0)
        per_eval = eval_batches * seconds_per_eval_batch
        per_step = 3 * self.micro_batches / context_from_environment().world_size * seconds_per_eval_batch
        return self.max_iters * per_step + evals * per_eval, per_eval


class RunForecast:
    """Times the first evaluation's batches and, if the run will take long, says so once, early.

    The first batch is left out (warm-up, compilation); the next few give the
    pace. On a GPU the clock is read after a synchronize, twice per run.
    """

    TIMED = 2

    def __init__(self, plan: RunPlan | None):
        self.plan, self.started, self.done = plan, None, plan is None

    def eval_batch_done(self, done: int, total: int) -> None:
        """Note an evaluation batch; after the timed ones, forecast (once)."""
        if self.done or total <= self.TIMED + 1:
            return
        if done == 1:
            self.started = self.clock()
        elif done == 1 + self.TIMED and self.started is not None:
            self.done = True
            self.say((self.clock() - self.started) / self.TIMED, total)

    def clock(self) -> float:
        """Seconds, with a GPU's queued work done."""
        if self.plan.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def say(self, seconds_per_batch: float, eval_batches: int) -> None:
        """One line if the run will take longer than LONG_RUN_S."""
        total, per_eval = self.plan.forecast(seconds_per_batch, eval_batches)
        if total <= LONG_RUN_S:
            return
        quicker = QUICKER_RECIPES.get(self.plan.device)
        advice = (f"for a first run on this {self.plan.device}, try {quicker} (minutes)" if quicker else
                  "lower max_iters, eval_iters or the model's size for a quicker run")
        log.warning("this run will take about %s on %s (%s per evaluation); %s",
                    duration(total), self.plan.device, duration(per_eval), advice)


def duration(seconds: float) -> str:
    """A duration as people say it: 40 s, 12 min, 3.5 h, 2.1 days."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
