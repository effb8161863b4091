"""A model built without its weights, filled later a weight at a time: how an FSDP job starts.

An FSDP job must never hold the whole model in one process, yet it must start
from exactly the weights one process (or DDP) starts from with the same seed,
bitwise. The model's own constructor says what those are: it allocates each
weight with torch.empty and fills it with torch's initialisers, some of them
several times over (nn.Linear's default, then GPT-2's normal, then the scaled
projections), every draw moving the random generator on.

build() runs the constructor with torch.empty allocating on the meta device
(shapes, no memory) and writes down each initialiser call instead of making it.
fill() makes those calls later, in the same order and from the generator's
state when build() ran: each on a whole tensor of the weight's shape, on the
CPU (where one process builds its model before moving it to a GPU), so each
draw is that process's draw. A process keeps its rows of the result (its shard)
and lets the rest go: it never holds more than one whole weight beyond its shards.

Why not fill each shard on its own: torch's CPU generator is one Mersenne
Twister stream, and normal_ and uniform_ take a tensor's values from it in
order, so the rows a shard holds come after every draw for the rows before
them; the only way to those bits is to make the draws. A process draws as much
as one process does to build the model, and keeps only its share.

Tensors computed from values rather than filled (the rotary tables) are
computed as usual, on the CPU. An in-place change to a weight that is not a
whole-tensor initialiser cannot be replayed this way, and is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# Calls that write every element of a tensor whatever it held: replayed on a fresh whole tensor.
WHOLE_FILLS = frozenset({
    nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.constant_, nn.init.ones_,
    nn.init.zeros_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_,
    nn.init.xavier_normal_, torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.fill_,
    torch.Tensor.zero_,
})


@dataclass
class Fill:
    """One initialiser call the constructor made: func on target (a meta tensor), with its arguments."""

    func: Callable
    target: torch.Tensor
    args: tuple
    kwargs: dict

    def on(self, whole: torch.Tensor) -> None:
        """Make the call on whole instead of the meta tensor it was made on."""
        if "tensor" in self.kwargs:  # nn.init's functions pass their tensor by name
            self.func(*self.args, **{**self.kwargs, "tensor": whole})
        else:  # a Tensor method: the tensor is its first argument
            self.func(whole, *self.args[1:], **self.kwargs)


class Recorder(TorchFunctionMode):
    """While active: torch.empty allocates on the meta device, and initialisers of meta tensors are
    kept rather than made (on the meta device a fill computes nothing, yet the first one imports
    torch._dynamo, a second of start-up, through torch's Python reference of normal_).
    """

    def __init__(self):
        super().__init__()
        self.fills: list[Fill] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty:  # uninitialised memory: whatever it will hold is written by a fill
            kwargs = {**kwargs, "device": "meta"}
        target = kwargs.get("tensor", args[0] if args else None)
        if isinstance(target, torch.Tensor) and target.is_meta:
            if func in WHOLE_FILLS:
                self.fills.append(Fill(func, target, args, kwargs))
                return target
            if writes_in_place(func):
                raise RuntimeError(f"{getattr(func, '__qualname__', func)} changes a weight in place while "
                                   "the model is built; only whole-tensor initialisers can be deferred")
        return func(*args, **kwargs)


def writes_in_place(func: Callable) -> bool:
    """True for torch's in-place operations (add_, copy_, ...) and item assignment."""
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))


@dataclass
class Deferred:
    """A model whose weights are on the meta device, and the calls that fill them (fill())."""

    model: nn.Module
    fills: list[Fill]
    rng_state: torch.Tensor  # the CPU generator's when the constructor ran
    names: dict[int, str]  # each weight's name, by the id of its meta tensor (what the fills were made on)

    def fill(self, keep: Callable[[str, torch.Tensor], None]) -> None:
        """Make every recorded call on a whole tensor in turn, and hand each weight's to keep(name, whole).

        keep receives a weight once per call that fills it, the last being its
        value; a call on a tensor the model no longer holds (the token embedding's
        own, replaced by the tied output layer's) is made for its draws alone.
        The generator goes on from where those draws leave it, as after the constructor.
        """
        torch.set_rng_state(self.rng_state)
        for fill in self.fills:
            whole = torch.empty(fill.target.shape, dtype=fill.target.dtype)
            with torch.no_grad():
                fill.on(whole)
            if id(fill.target) in self.names:
                keep(self.names[id(fill.target)], whole)


def shapes_only(make: Callable[[], nn.Module]) -> nn.Module:
    """make()'s model, its weights on the meta device and never initialised: its names and shapes,
    to check a checkpoint against, at no cost in memory or time.
    """
    with Recorder():
        return make()


def build(make: Callable[[], nn.Module]) -> Deferred:
    """make()'s model with its weights on the meta device, and the calls that fill them."""
    recorder, rng_state = Recorder(), torch.get_rng_state()
    with recorder:
        model = make()
    names = {id(param): name for name, param in model.named_parameters()}
    filled = {id(fill.target) for fill in recorder.fills}
    unfilled = [name for key, name in names.items() if key not in filled]
    unfilled += [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if unfilled:
        raise RuntimeError(f"cannot defer the initialisation of {unfilled}: nothing fills them")
    return Deferred(model, recorder.fills, rng_state, names)
