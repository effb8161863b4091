"""Deterministic fault injection, so the recovery promises can be tested for real.

Set NANOGPT_FAULTS to a comma-separated list of ``name=value`` items:

- ``signal_at_iter=K:SIGTERM`` sends the process SIGTERM (or SIGINT) just
  before optimizer step K, as a cluster scheduler or a Ctrl-C would;
  ``signal_at_iter=K:SIGINT*2`` sends it twice in a row (an impatient Ctrl-C).
- ``nan_loss_at_iter=K`` makes the loss of step K NaN, as a diverging run would.
- ``kill_during_save=N`` kills the process with SIGKILL in the middle of writing
  the N-th last.pt: half of the file is on disk and nothing is renamed yet.

Unset (always, outside tests) every hook here does nothing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

ENV_VAR = "NANOGPT_FAULTS"
_saves_seen: dict[str, int] = {}


def configured() -> dict[str, str]:
    """The faults asked for in NANOGPT_FAULTS, as {name: value}."""
    items = (item.partition("=") for item in os.environ.get(ENV_VAR, "").split(",") if item.strip())
    return {name.strip(): value.strip() for name, _, value in items}


def before_step(iteration: int) -> None:
    """Send the configured signal(s) to this process if step `iteration` is the chosen one."""
    spec = configured().get("signal_at_iter")
    if not spec:
        return
    at, _, name = spec.partition(":")
    name, _, times = name.partition("*")
    if int(at) == iteration:
        for _ in range(int(times or 1)):
            os.kill(os.getpid(), getattr(signal, name or "SIGTERM"))


def poison_loss(loss: torch.Tensor, iteration: int) -> torch.Tensor:
    """The loss, or NaN if this is the step where a NaN loss was asked for."""
    at = configured().get("nan_loss_at_iter")
    if at is not None and int(at) == iteration:
        return loss * float("nan")
    return loss


def during_checkpoint_write(dest: Path, tmp: Path) -> None:
    """Called once the temporary file of a checkpoint is written, before it is renamed.

    With kill_during_save=N, the N-th write of last.pt is cut to half its size
    and the process is killed outright, exactly as a power cut or OOM kill would.
    """
    at = configured().get("kill_during_save")
    if at is None or dest.name != "last.pt":
        return
    _saves_seen[dest.name] = _saves_seen.get(dest.name, 0) + 1
    if _saves_seen[dest.name] == int(at):
        size = tmp.stat().st_size
        with open(tmp, "r+b") as f:
            f.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
