"""How a run stops early: a stop signal (Ctrl-C, SIGTERM) or a loss that is no longer finite."""

from __future__ import annotations

import logging
import math
import signal
import threading

from nanogpt.errors import UserError

log = logging.getLogger("nanogpt.stops")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped without saving it."""


def check_finite(loss: float, iteration: int, what: str, last_checkpoint: str) -> None:
    """Raise TrainingDiverged naming the iteration if loss is NaN or infinite."""
    if math.isfinite(loss):
        return
    raise TrainingDiverged(
        f"{what} became {loss} at iteration {iteration}; training stopped and nothing from it was "
        f"saved; {last_checkpoint}. Try a lower optimizer.lr, a warmup (optimizer.warmup_iters) "
        "or gradient clipping (optimizer.grad_clip)"
    )


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step.

    The first signal only sets `received`; the loop checks it between steps,
    checkpoints and exits. A second signal aborts at once (exit 130), logging
    what on_abort() says about where the run stood.
    Handlers can be installed only from the main thread; elsewhere (some
    launchers run jobs in threads) signals keep their usual meaning.
    """

    def __init__(self, on_abort=lambda: "") -> None:
        self.on_abort = on_abort
        self.received: signal.Signals | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        """First signal: note it and say what happens; second: abort now."""
        if self.received is not None:
            log.error("aborted at once %s", self.on_abort())
            raise SystemExit(128 + signal.SIGINT)
        self.received = signal.Signals(signum)
        log.warning("%s received: finishing this step, then saving a checkpoint "
                    "(press Ctrl-C again to abort at once)", self.received.name)
