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

state_of takes this process's weights and optimizer state for a checkpoint;
weights/sharded.py's load_into puts a checkpoint's back, sharded or whole.
FSDP and its state dicts are imported where a sharded run uses them: they bring
most of torch.distributed (0.7 s), which every other command would pay at start-up.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from nanogpt.errors import ConfigError
from nanogpt.model import GPT
from nanogpt.runtime.distributed import DistributedContext

COMPILED = "_orig_mod."  # torch.compile's prefix in a compiled module's parameter names


def check_precision(dtype: torch.dtype) -> None:
    """Refuse float16, whose loss scaling would need the processes to agree on overflows in their shards."""
    if dtype == torch.float16:
        raise ConfigError("distributed.strategy=fsdp computes in bfloat16 or float32, and device.dtype is "
                          "float16 (the default on GPUs without bfloat16); use device.dtype=float32, or "
                          "distributed.strategy=ddp")


def shard(model: GPT, device: torch.device, dtype: torch.dtype, compile: bool) -> GPT:
    """model, sharded across the job in place: each block a unit, then the rest (embeddings, final norm).

    Every process built the same weights (from the same seed, or the same
    init_from); fully_shard keeps each one's slice of them. compile compiles each
    block before it is wrapped, so FSDP's gathering stays outside the compiled code.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                  reduce_dtype=torch.float32)
    for i, block in enumerate(model.transformer.h):
        if compile:
            model.transformer.h[i] = block = torch.compile(block)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # The logits GPT.forward returns are a slice (the padded vocabulary cut off), which FSDP warns
    # could lose a gradient if changed in place; nothing here changes them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


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
