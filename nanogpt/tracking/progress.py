"""A progress bar for training iterations that stays out of the way of the log.

The bar is drawn only when stderr is a terminal (tqdm's ``disable=None``); in a
batch job or under a pipe there is no bar at all. While the bar is shown, log
lines to the console are written through tqdm so they do not tear it, and the
log file keeps its one clean line per log interval either way.
"""

from __future__ import annotations

import contextlib
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class TrainingProgress:
    """A bar over optimizer steps, moved to an absolute iteration at each log interval."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        # disable=None: tqdm draws only when stderr is a terminal.
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="it",
                        disable=None if enabled else True, dynamic_ncols=True)
        self.redirect = contextlib.ExitStack()
        self.last_drawn = 0.0
        if not self.bar.disable:
            self.redirect.enter_context(logging_redirect_tqdm())

    def update_to(self, iteration: int, loss: float | None = None) -> None:
        """Show that iteration steps are done (and the latest training loss)."""
        if self.bar.disable:
            return
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(iteration - self.bar.n)

    def evaluating(self, done: int, total: int, iteration: int) -> None:
        """Show how far the evaluation at iteration has come (on a CPU it can take minutes)."""
        if self.bar.disable:
            return
        now = time.monotonic()
        if done == total or now - self.last_drawn > 0.5:  # a GPU evaluates faster than a terminal draws
            self.bar.set_postfix_str(f"eval at {iteration}: {done}/{total}" if done < total else "")
            self.last_drawn = now

    def close(self) -> None:
        """Remove the bar and give console logging back its own handlers."""
        self.bar.close()
        self.redirect.close()
