"""Optimizers beyond plain AdamW.

Muon orthogonalises each update of a weight matrix, which lets hidden layers
learn faster per step (torch.optim.Muon's update, written out here so it needs
no recent torch, with the orthogonalisation in float32 off the GPU and batched
over same-shape matrices). It is meant for the 2-D weights inside
the transformer blocks only; embeddings, the (tied) output layer, biases and
LayerNorm gains stay with AdamW. MuonWithAdamW steps both as one optimizer.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn


def orthogonalize(matrices: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Push every singular value of each matrix towards 1 (Muon's Newton–Schulz iteration).

    matrices is one matrix (rows, cols) or a stack of them (count, rows, cols);
    a stack is orthogonalised in one batched call per step, which on a CPU is
    much faster than one call per matrix. Each step applies the odd polynomial
    a*X + b*(X X^T) X + c*(X X^T)^2 X, which keeps the singular vectors and maps
    each singular value s to a*s + b*s^3 + c*s^5. The coefficients grow small
    values fast, so a few steps bring them all roughly into [0.7, 1.2]: the
    update keeps its directions but loses its scale.
    """
    a, b, c = coefficients
    x = matrices.to(dtype)
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    wide = x.size(1) <= x.size(2)
    if not wide:
        x = x.mT  # iterate on the smaller Gram matrix
    # The Frobenius norm bounds the largest singular value, so this puts them all in [0, 1].
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if not wide:
        x = x.mT
    return x[0] if single else x


# Keller Jordan's Newton–Schulz coefficients and settings, as torch.optim.Muon (torch >= 2.9) uses them.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
LR_ADJUSTMENTS = (None, "original", "match_rms_adamw")


class Muon(torch.optim.Optimizer):
    """Muon with torch.optim.Muon's arguments, update rule and state, on any torch this project supports.

    Written here rather than subclassing torch.optim.Muon, which only torch >= 2.9
    has, so training with Muon works down to the declared torch floor; a test
    checks it takes exactly torch's steps where torch has Muon. Two things differ,
    both for speed: the Newton–Schulz iteration runs in a precision of our
    choice, and matrices of the same shape (the same layer in every block) are
    orthogonalised as one stack. torch.optim.Muon always orthogonalises in
    bfloat16. That is right on a GPU, but a CPU without bfloat16 matrix units
    emulates it: for the tiny model on two AVX2 cores one step took 743 ms in
    bfloat16 against 21 ms in float32. ns_dtype=None uses bfloat16 for CUDA
    parameters and float32 for all others.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = NS_EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None,
                 ns_dtype: torch.dtype | None = None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Muon needs lr, momentum, weight_decay >= 0: {lr}, {momentum}, {weight_decay}")
        if adjust_lr_fn not in LR_ADJUSTMENTS:
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is not one of {LR_ADJUSTMENTS}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon updates matrices only, not a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """Momentum, then orthogonalise the update, then decoupled weight decay and the step."""
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            same_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                same_shape[(p.shape, p.device)].append((p, update))
            for (shape, device), pairs in same_shape.items():
                dtype = self.ns_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
                updates = orthogonalize(torch.stack([update for _, update in pairs]),
                                        group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                step_size = lr * rms_matching_scale(shape, group["adjust_lr_fn"])
                for (p, _), update in zip(pairs, updates, strict=True):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=-step_size)


def rms_matching_scale(shape: torch.Size, rule: str | None) -> float:
    """Learning-rate multiplier for a matrix of this shape, as torch.optim.Muon defines it.

    "original" (None) is Keller Jordan's sqrt(max(1, rows / cols)); "match_rms_adamw"
    is Moonshot's 0.2 * sqrt(max(rows, cols)), which makes updates as large as AdamW's.
    """
    rows, cols = shape[:2]
    if rule in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


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
    muon = Muon(
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
