"""The optimizer and its learning-rate schedule: AdamW, and Muon for the blocks' matrices.

optimizer.name picks a builder from OPTIMIZERS; OptimizerConfig declares every
optimizer.KEY once. Both optimizers decay only matrices (>= 2-D): biases and
LayerNorm gains have nothing to gain from being pulled towards zero.

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
from dataclasses import dataclass

import torch
from torch import nn

from nanogpt.options import check_choices, option, require
from nanogpt.runtime.device import bf16_instructions


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
NS_DTYPES = ("auto", "float32", "bfloat16")


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
    bfloat16 against 21 ms in float32, while two cores with AVX512-BF16 took
    9 ms against 18. ns_dtype=None picks by hardware (newton_schulz_dtype).
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
                dtype = self.ns_dtype or newton_schulz_dtype(device)
                updates = orthogonalize(torch.stack([update for _, update in pairs]),
                                        group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                step_size = lr * rms_matching_scale(shape, group["adjust_lr_fn"])
                for (p, _), update in zip(pairs, updates, strict=True):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=-step_size)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies it natively (GPUs, x86 CPUs with AVX512-BF16), else float32."""
    if device.type == "cuda" or (device.type == "cpu" and bf16_instructions()):
        return torch.bfloat16
    return torch.float32


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
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """Both optimizers' state, for a checkpoint."""
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float],
          eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D) only, never on biases or norm gains.

    fused=None uses the fused CUDA kernel when the parameters live on a GPU.
    """
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if fused is None:
        fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def build_adamw(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW on every trainable parameter (optimizer=adamw)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw(params, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)


def build_muon(model: nn.Module, cfg: OptimizerConfig) -> MuonWithAdamW:
    """Muon on the transformer blocks' matrices, AdamW on the rest (optimizer=muon)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in trainable if p.dim() == 2 and ".h." in f".{name}"]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for _, p in trainable if id(p) not in hidden_ids]
    muon = Muon(
        [{"params": hidden, "lr_scale": cfg.muon_lr / cfg.lr}],
        lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
        ns_dtype=None if cfg.muon_ns_dtype == "auto" else getattr(torch, cfg.muon_ns_dtype),
    )
    rest_optimizer = adamw(rest, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, fused=False)
    return MuonWithAdamW(muon, rest_optimizer)


OPTIMIZERS = {"adamw": build_adamw, "muon": build_muon}


@dataclass
class OptimizerConfig:
    """The optimizer and its schedule: linear warmup, then cosine decay to min_lr."""

    name: str = option("adamw", "adamw; muon: Muon on the blocks' matrices + AdamW for the rest",
                       choices=tuple(OPTIMIZERS))
    lr: float = option(3e-4, "peak learning rate (AdamW's, under muon too)")
    min_lr: float = option(3e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = option(0.1, "decoupled weight decay, on matrices only")
    beta1: float = option(0.9, "AdamW's first-moment decay")
    beta2: float = option(0.95, "AdamW's second-moment decay")
    eps: float = option(1e-8, "AdamW's denominator guard")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 disables clipping")
    warmup_iters: int = option(100, "steps of linear warmup")
    decay_lr: bool = option(True, "cosine decay after warmup; false: constant lr")
    lr_decay_iters: int | None = option(None, "where the cosine reaches min_lr; null: max_iters")
    muon_lr: float = option(0.02, "optimizer=muon: peak learning rate of the blocks' matrices")
    muon_momentum: float = option(0.95, "optimizer=muon: Nesterov momentum of Muon")
    # Each Newton-Schulz iteration is three matrix products per weight matrix: on a small
    # model's CPU step they cost as much as a third of the step, and fewer, less exact,
    # iterations may still orthogonalise well enough.
    muon_ns_steps: int = option(5, "optimizer=muon: Newton-Schulz iterations per step (torch's 5)")
    muon_ns_dtype: str = option("auto", "optimizer=muon: precision of Newton-Schulz; auto: bfloat16 on GPUs "
                                "and CPUs with bfloat16 instructions, float32 elsewhere", choices=NS_DTYPES)

    def __post_init__(self):
        check_choices(self)
        require(self.lr > 0, f"lr={self.lr} must be positive")
        require(0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        require(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        require(self.warmup_iters >= 0, f"warmup_iters={self.warmup_iters} must be >= 0")
        require(self.lr_decay_iters is None or self.lr_decay_iters > self.warmup_iters,
                f"lr_decay_iters={self.lr_decay_iters} must be larger than warmup_iters")
        require(self.muon_lr > 0, f"muon_lr={self.muon_lr} must be positive")
        require(self.muon_ns_steps >= 1, f"muon_ns_steps={self.muon_ns_steps} must be at least 1")


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer cfg.name asks for, over model's parameters."""
    return OPTIMIZERS[cfg.name](model, cfg)


def learning_rate_at(it: int, cfg: OptimizerConfig, max_iters: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at lr_decay_iters, then flat."""
    if not cfg.decay_lr:
        return cfg.lr
    decay_iters = cfg.lr_decay_iters or max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
