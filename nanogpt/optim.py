"""Optimizers beyond plain AdamW.

Muon (torch.optim.Muon) orthogonalises each update of a weight matrix, which
lets hidden layers learn faster per step. It is meant for the 2-D weights inside
the transformer blocks only; embeddings, the (tied) output layer, biases and
LayerNorm gains stay with AdamW. MuonWithAdamW steps both as one optimizer.
"""

from __future__ import annotations

import torch
from torch import nn


class MuonWithAdamW:
    """Muon for the blocks' weight matrices plus AdamW for every other parameter.

    Behaves like one torch optimizer to the training loop: param_groups (for the
    learning-rate schedule), step, zero_grad, state_dict and load_state_dict.
    Muon's groups carry an ``lr_scale``: the schedule's learning rate is
    multiplied by it, so one schedule drives both optimizers.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon = muon
        self.adamw = adamw

    @property
    def param_groups(self) -> list[dict]:
        """The groups of both optimizers, Muon's first."""
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        """Per-parameter state of both optimizers (GradScaler reads it)."""
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure=None) -> None:
        """Update every parameter once."""
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter."""
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """Both optimizers' state, for a checkpoint."""
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def configure_muon(
    model: nn.Module,
    learning_rate: float,
    muon_learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float = 1e-8,
    momentum: float = 0.95,
) -> MuonWithAdamW:
    """Muon on the transformer blocks' matrices, AdamW (decay on matrices only) on the rest."""
    hidden = [p for name, p in model.named_parameters() if p.dim() == 2 and ".h." in f".{name}"]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    muon = torch.optim.Muon(
        [{"params": hidden, "lr_scale": muon_learning_rate / learning_rate}],
        lr=muon_learning_rate, weight_decay=weight_decay, momentum=momentum,
    )
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=learning_rate, betas=betas, eps=eps,
    )
    return MuonWithAdamW(muon, adamw)
