"""FSDP2 (distributed.strategy=fsdp): each of N processes holds 1/N of the weights, gradients, optimizer.

PyTorch's fully_shard does the work. Each transformer block is a unit of its
own: its weights are all-gathered just before it computes (in the forward pass,
and again in the backward pass) and freed after, so a process holds its shards
plus about one block's whole weights at a time. Gradients are reduce-scattered
in float32, each process keeping the gradients of its own shards, and the
optimizer steps only those. On GPUs the blocks compute in bfloat16 (FSDP casts
the gathered weights; the shards and the optimizer stay float32).

Unlike DDP's no_sync(), gradients are reduced after every micro-batch of
gradient accumulation: holding whole unreduced gradients between micro-batches
would give back the memory sharding saves.

build() makes a fresh sharded model without the whole of it ever existing: the
GPT is built on the meta device (shapes, no memory), sharded, then each process
allocates its shards and fills them with the very values one process's GPT(config)
draws (deferred_init.py), so FSDP starts from DDP's weights, bitwise.
put_rows() is how any whole tensor read from disk or drawn reaches a shard: each
process copies its own rows, one tensor at a time.

On the CPU, hand_back_freed_memory() keeps the C library from holding on to the
whole weights FSDP gathers and frees for every block and every pass.

state_of takes this process's weights and optimizer state for a checkpoint;
weights/sharded.py's load_into puts a checkpoint's back, sharded or whole.
FSDP and its state dicts are imported where a sharded run uses them: they bring
most of torch.distributed (0.7 s), which every other command would pay at start-up.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from nanogpt.errors import ConfigError
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime import deferred_init
from nanogpt.runtime.device import CompiledModule
from nanogpt.runtime.distributed import DistributedContext

COMPILED = "_orig_mod."  # torch.compile's prefix in a compiled module's parameter names


def check_precision(dtype: torch.dtype) -> None:
    """Refuse float16, whose loss scaling would need the processes to agree on overflows in their shards."""
    if dtype == torch.float16:
        raise ConfigError("distributed.strategy=fsdp computes in bfloat16 or float32, and device.dtype is "
                          "float16 (the default on GPUs without bfloat16); use device.dtype=float32, or "
                          "distributed.strategy=ddp")


# Tensors from this size up are allocated straight from the system and handed back when freed (glibc).
MMAP_FROM = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter for it


def hand_back_freed_memory() -> None:
    """Have the C library hand big freed blocks back to the system at once (glibc on Linux; else nothing).

    CPU tensors are malloc()ed. FSDP allocates a block's whole weights anew
    for each forward and backward pass, and its whole gradients, and frees them
    right after; glibc, by default, takes each block of up to 32 MB from its
    heap after the first such block is freed, and the small tensors kept in
    between (the activations) pin the freed space, which the process then keeps:
    about 1 GiB of a gpt2-medium-shaped process on 2 CPU processes, a quarter of
    its peak (docs/benchmarks.md). A fixed threshold (1 MiB) leaves the small
    tensors in the heap and maps the big ones. It changes no number, only where
    memory comes from; MALLOC_MMAP_THRESHOLD_ in the environment, if set, wins.
    (On GPUs the CUDA caching allocator meets FSDP's pattern on its own terms.)
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_FROM)
    except (OSError, AttributeError):  # not glibc (musl, ...): its own policy stands
        pass


def shard(model: GPT, device: torch.device, dtype: torch.dtype, compile: bool) -> GPT:
    """model, sharded across the job in place: each block a unit, then the rest (embeddings, final norm).

    fully_shard keeps each process's slice of every weight (of meta tensors,
    from build(): only their shapes). compile compiles each block before it is
    wrapped, so FSDP's gathering stays outside the compiled code.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                  reduce_dtype=torch.float32)
    for i, block in enumerate(model.transformer.h):
        if compile:
            model.transformer.h[i] = block = CompiledModule(block, "a sharded block of the training step")
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # The logits GPT.forward returns are a slice (the padded vocabulary cut off), which FSDP warns
    # could lose a gradient if changed in place; nothing here changes them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def build(config: GPTConfig, device: torch.device, dtype: torch.dtype, compile: bool) -> GPT:
    """A fresh GPT of config's shape, sharded, in which this process holds and has filled only its shards.

    Its weights are bitwise those GPT(config) would draw here in one process;
    like GPT(config), it moves the CPU generator on by those draws.
    """
    deferred = deferred_init.build(lambda: GPT(config))
    model = shard(deferred.model, device, dtype, compile)
    computed = dict(model.named_buffers())  # the rotary tables, computed already; to_empty drops them
    model.to_empty(device=device)  # each process's shards, allocated (uninitialised)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(computed[name])
    params = {name.replace(COMPILED, ""): param for name, param in model.named_parameters()}
    deferred.fill(lambda name, whole: put_rows(params[name], whole))
    return model


def is_shard(tensor: torch.Tensor) -> bool:
    """True for a process's shard of a weight (a DTensor) rather than a whole tensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # imported by FSDP, before any shard exists
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def put_rows(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy whole's rows into target (a whole tensor, or this process's shard of one), as far as both go.

    FSDP2 cuts a weight along its first dimension as torch.chunk does, so
    process r holds rows r*c .. (r+1)*c - 1 (c rounded up): each process reads
    only those rows of whole. Where whole has fewer rows than target (a padded
    vocabulary) the rest keep their values; where more (positions cropped) the
    rest are left out.
    """
    local, start = target, 0
    if whole.dim() == 0:
        with torch.no_grad():
            local.copy_(whole)
        return
    if is_shard(target):
        local, mesh = target.to_local(), target.device_mesh
        start = mesh.get_local_rank() * -(-target.size(0) // mesh.size())
    rows = max(0, min(local.size(0), whole.size(0) - start))
    with torch.no_grad():
        local[:rows].copy_(whole[start:start + rows])


def torch_optimizers(optimizer) -> dict[str, torch.optim.Optimizer]:
    """The torch optimizers in the run's optimizer, under the key its state_dict() gives each ("": itself).

    MuonWithAdamW (training/optim.py) steps a Muon and an AdamW together and saves them as "muon" and "adamw".
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return {"": optimizer}
    return {"muon": optimizer.muon, "adamw": optimizer.adamw}


def state_of(model: nn.Module, optimizer) -> dict:
    """{"model", "optimizer"} as this process holds them: its shards (DTensors) under FSDP, keyed by name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    parts = list(torch_optimizers(optimizer).values())
    stepped = any(part.state for part in parts)
    weights, optimizer_state = get_state_dict(model, parts)
    if not stepped:
        forget_state(parts, optimizer_state)
    return {"model": weights, "optimizer": optimizer_state}


def forget_state(parts: list[torch.optim.Optimizer], optimizer_state: dict) -> None:
    """Take back the state get_state_dict and set_state_dict give an optimizer that has not stepped.

    They make one by a step with learning rate 0, which leaves the weights but
    counts a step: AdamW's first real update would then be bias-corrected as its second.
    """
    for part in parts:
        part.state.clear()
    optimizer_state["state"] = {}


def whole_copy(model: GPT, device: torch.device, context: DistributedContext) -> GPT | None:
    """A whole, unsharded copy of model on rank 0 (None on the others), for what one process does alone.

    Every process takes part in gathering the weights, into rank 0's CPU memory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if not context.is_main:
        return None
    copy = GPT(model.config)
    copy.load_state_dict(weights)
    return copy.to(device)
