"""Catching a diverged (NaN or infinite) training loss without waiting for the device every step.

Reading a loss on the host (``loss.item()``) makes the CPU wait until the GPU
has finished that step, so the next step cannot be queued behind it. A NaN only
matters when something would record or save it, so LossWatch notes the first
non-finite loss on the device, with tensor operations that queue like the step
itself, and the loop asks it only at its log, evaluation and save points: one
host sync there, none in between. A NaN is still never saved, because every
checkpoint is written after such a check; the error names the very iteration
where the loss first went bad, not the one where it was noticed.
"""

from __future__ import annotations

import torch

from nanogpt.runtime.stops import check_finite


class LossWatch:
    """The first iteration (and its loss) whose training loss was not finite, kept on the device."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # -1: none yet
        self.bad_loss = torch.zeros((), device=device)

    def watch(self, loss: torch.Tensor, iteration: int) -> None:
        """Remember iteration if loss is its first non-finite one; no host sync."""
        fresh = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(fresh, iteration, self.first_bad)
        self.bad_loss = torch.where(fresh, loss.detach().float(), self.bad_loss)

    def check(self, last_checkpoint: str) -> None:
        """Raise TrainingDiverged (see nanogpt/runtime/stops.py) if any watched loss was not finite."""
        first_bad = int(self.first_bad.item())  # the one host sync, at a log or save point
        if first_bad >= 0:
            check_finite(self.bad_loss.item(), first_bad, "the training loss", last_checkpoint)
