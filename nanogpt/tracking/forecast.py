"""Telling a first run the truth early: how long it will take on this device, and a quicker recipe if long."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

from nanogpt.runtime.distributed import context_from_environment

log = logging.getLogger("nanogpt.tracking")


# A first run that will take longer than this on its device is told so, with a quicker recipe.
LONG_RUN_S = 15 * 60
# The quickest recipe (experiments/), for a first run where no GPU trains: its model and steps on a CPU.
QUICKER_RECIPE = "shakespeare_char_cpu_fast"
QUICKER_RECIPE_TAKES = "under a minute"
QUICKER_RECIPE_DEVICES = ("cpu", "mps")


@dataclass
class RunPlan:
    """What a run will do, for the duration forecast: steps, evaluations, work per step, device, recipe."""

    max_iters: int
    eval_interval: int
    micro_batches: int  # forward/backward passes per step, all processes together
    device: str
    eval_at_start: bool = True  # whether it evaluates before its first step too
    overrides: tuple[str, ...] = ()  # its command line, which names the recipe it runs (+experiment=NAME)

    @property
    def recipe(self) -> str | None:
        """The recipe (experiments/NAME.yaml) the run was started with, if any."""
        for override in self.overrides:
            key, _, value = override.lstrip("+~").partition("=")
            if key == "experiment":
                return value
        return None

    def forecast(self, seconds_per_eval_batch: float, eval_batches: int) -> tuple[float, float]:
        """(whole run, one evaluation) in seconds, from the time of one evaluation batch.

        A training micro-batch (forward and backward) costs about three forward passes.
        """
        evals = (self.max_iters // self.eval_interval + int(self.eval_at_start)
                 + (self.max_iters % self.eval_interval > 0))
        per_eval = eval_batches * seconds_per_eval_batch
        per_step = 3 * self.micro_batches / context_from_environment().world_size * seconds_per_eval_batch
        return self.max_iters * per_step + evals * per_eval, per_eval

    def quicker(self) -> str:
        """What a long run is advised to do instead: the quickest recipe, unless that is the one running."""
        if self.device in QUICKER_RECIPE_DEVICES and self.recipe != QUICKER_RECIPE:
            return (f"for a first run on this {self.device}, try +experiment={QUICKER_RECIPE} "
                    f"({QUICKER_RECIPE_TAKES})")
        return "lower max_iters, eval_iters or the model's size for a quicker run"


class RunForecast:
    """Times the first evaluation's batches and, if the run will take long, says so once, early.

    The first batch is left out (warm-up, compilation); the median of the next
    TIMED gives the pace: a median of several, so that a batch slowed by
    another program on a busy machine, or by the first batches' warm-up, does
    not stand for the whole run. On a GPU the clock is read after a
    synchronize, for those few batches only.
    """

    TIMED = 5

    def __init__(self, plan: RunPlan | None):
        self.plan, self.last, self.times, self.done = plan, None, [], plan is None

    def eval_batch_done(self, done: int, total: int) -> None:
        """Note an evaluation batch; after the timed ones, forecast (once)."""
        if self.done or total <= self.TIMED + 1:
            return
        now = self.clock()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        if len(self.times) == self.TIMED:
            self.done = True
            self.say(statistics.median(self.times), total)

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
        log.warning("this run will take about %s on %s (%s per evaluation); %s",
                    duration(total), self.plan.device, duration(per_eval), self.plan.quicker())


def duration(seconds: float) -> str:
    """A duration as people say it: 40 s, 12 min, 3.5 h, 2.1 days."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
