"""How a run stops early: a stop signal (Ctrl-C, SIGTERM) or a loss that is no longer finite.

A stop must be prompt (a scheduler's grace period is short, and a person at a
terminal will not wait minutes) and must never cost exactness: what is saved is
always the state after a completed step, so resuming gives the same weights as a
run that was never interrupted. Two ways to get there:

* Between steps, a signal only sets a flag; the loop checks it after each step
  and saves.
* Inside an interruptible() block (the forward/backward part of a step, an
  evaluation, the end-of-run sample), a signal interrupts at once by raising
  Interrupted; the block's owner puts back what it had changed, so the state
  is again that of the last completed step. Only a process that trains alone
  does this: under torchrun a rank that left a step half-way would leave its
  peers waiting in a collective, so ranks instead agree, through
  StopVote (runtime/distributed.py), on a step after which all of them stop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

from nanogpt.errors import UserError
from nanogpt.runtime.distributed import context_from_environment

log = logging.getLogger("nanogpt.stops")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A scheduler's warning that the job is about to be preempted or time out: submitit (Hydra's SLURM
# launcher) listens for it to requeue the job. Training takes it too where someone listens for it,
# saves, and then passes it on (see StopSignals.__exit__).
WARNING_SIGNAL = signal.SIGUSR2
STOPPED_STATUSES = {128 + signum for signum in (*STOP_SIGNALS, signal.SIGUSR2)}  # "ended by a signal"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped without saving it."""


class Interrupted(BaseException):  # noqa: N818  (like KeyboardInterrupt, which no `except Exception` swallows)
    """A stop signal ended an interruptible() block half-way."""

    def __init__(self, signum: signal.Signals):
        super().__init__(signum.name)
        self.signum = signum


def exit_at_once(status: int) -> NoReturn:
    """Exit with status now, without the interpreter's teardown.

    Called once a stopped process has saved, closed and said everything. What
    remains is Python freeing torch's objects one by one, which takes a second or
    more on a busy machine: time that a scheduler's grace period, the other ranks
    waiting on this one, or a person at the terminal should not have to spend.
    """
    logging.shutdown()  # flushes and closes the log files
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


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
    """While active, SIGINT and SIGTERM ask the run to stop; a second one aborts at once.

    received is this process's own signal; agreed is the one the whole job stops
    for, set when should_stop() returns True. agree(local) turns this process's
    wish (0, or a signal number) into the job's decision: the identity for a
    single process, StopVote.poll under torchrun. alone says whether
    interruptible() blocks may really be interrupted (a single process).
    Under torchrun every rank gets the signal, and rank 0 alone says so.
    WARNING_SIGNAL counts as a stop signal where a Python handler for it is
    already installed (submitit's); once the run has stopped and saved, that
    handler gets the signal (it requeues the job and exits).
    Handlers can be installed only from the main thread; elsewhere (some
    launchers run jobs in threads) signals keep their usual meaning.
    """

    def __init__(self, on_abort: Callable[[], str] = lambda: "",
                 agree: Callable[[int], int] = lambda local: local, alone: bool = True) -> None:
        self.on_abort, self.agree, self.alone = on_abort, agree, alone
        self.received: signal.Signals | None = None
        self.agreed: signal.Signals | None = None
        self.interruptible_depth = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            listened = callable(signal.getsignal(WARNING_SIGNAL))
            for signum in STOP_SIGNALS + ((WARNING_SIGNAL,) if listened else ()):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.signum == WARNING_SIGNAL and exc_info[0] is None and WARNING_SIGNAL in self.previous:
            self.previous[WARNING_SIGNAL](WARNING_SIGNAL, None)  # saved: now submitit may requeue

    def handle(self, signum: int, frame) -> None:
        """First signal: note it (and interrupt an interruptible block); second: abort now."""
        if self.received is not None:
            log.error("aborted at once %s", self.on_abort())
            raise SystemExit(128 + signal.SIGINT)
        self.received = signal.Signals(signum)
        if context_from_environment().is_main:
            log.warning("%s received: stopping after this step, then saving a checkpoint "
                        "(press Ctrl-C again to abort at once)", self.received.name)
        if self.interruptible_depth and self.alone:
            raise Interrupted(self.received)

    def should_stop(self) -> bool:
        """True once a stop signal reached this process or (under torchrun) any process of the job.

        Every process of a job gets True at the same call, so all stop after the same step.
        """
        decision = self.agree(int(self.received or 0))
        if decision:
            self.agreed = signal.Signals(decision)
        return self.agreed is not None

    def stop_here(self) -> None:
        """Raise Interrupted if the job agrees to stop now (see should_stop)."""
        if self.should_stop():
            raise Interrupted(self.agreed)

    @property
    def signum(self) -> signal.Signals | None:
        """The signal the run stops for: the job's agreed one, else this process's own."""
        return self.agreed or self.received

    @contextlib.contextmanager
    def interruptible(self, undo: Callable[[], None] | None = None,
                      alone: bool | None = None) -> Iterator[None]:
        """Inside, a stop signal raises Interrupted at once, where the process is alone (see class doc).

        undo() runs if the block ends with Interrupted (however raised): it puts back
        what the block changed, so the state is again that of the last completed step.
        A signal that came before the block raises at its start, so no work is begun in vain.
        """
        alone = self.alone if alone is None else alone
        previous_alone, self.alone = self.alone, alone
        self.interruptible_depth += alone
        try:
            if alone and self.received is not None:
                raise Interrupted(self.received)
            yield
        except Interrupted:
            if undo is not None:
                undo()
            raise
        finally:
            self.interruptible_depth -= alone
            self.alone = previous_alone

    @contextlib.contextmanager
    def stopping_early(self, stop_early: Callable[[signal.Signals], object]) -> Iterator[None]:
        """Inside, Interrupted (the state is that of the last completed step) ends in stop_early(signal)."""
        try:
            yield
        except Interrupted:
            stop_early(self.signum)
