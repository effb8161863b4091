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

The state functions move weights and optimizer state between this process's
tensors and a checkpoint, sharded (FSDP, DCP on disk) or whole (DDP, one
process), in any of those combinations: torch's get_state_dict/set_state_dict
key the optimizer's state by parameter name, which is what lets a checkpoint
of one layout be read into another.
FSDP and its state dicts are imported where a sharded run uses them: they bring
most of torch.distributed (0.7 s), which every other command would pay at start-up.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nanogpt.errors import ConfigError
from nanogpt.model import GPT
from nanogpt.runtime.distributed import DistributedContext
from nanogpt.weights import sharded

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


def load_state(model: nn.Module, optimizer, state: dict) -> None:
    """Put a checkpoint's weights and optimizer state into this process's model and optimizer.

    A sharded checkpoint (state["shards"]) is read by DCP, each process reading
    what its share needs, whatever the job's size and layout now; a whole one
    (DDP's, or a single process's) is cut into this process's shards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    parts = torch_optimizers(optimizer)
    if "shards" in state:
        folder = Path(state["shards"])
        weights, optimizer_state = get_state_dict(model, list(parts.values()))  # the shapes to read into
        if not sharded.holds(folder, "optimizer"):  # saved before the first step
            optimizer_state["state"] = {}
        sharded.read_into(folder, {"model": weights, "optimizer": optimizer_state["state"]})
        optimizer_state["param_groups"] = state["optimizer"]["param_groups"]
        options = None
    else:
        weights, optimizer_state = state["model"], keyed_by_name(state["optimizer"], parts, model)
        options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, list(parts.values()), model_state_dict=weights, optim_state_dict=optimizer_state,
                   options=options)
    if not optimizer_state["state"]:
        forget_state(list(parts.values()), optimizer_state)


def keyed_by_name(saved: dict, parts: dict[str, torch.optim.Optimizer], model: nn.Module) -> dict:
    """A whole optimizer.state_dict() (parameters numbered in group order) keyed by parameter name instead.

    The run builds its optimizer's groups over the same parameters in the same
    order as the run that saved (resume keeps the model and optimizer), so the
    n-th number of a saved group is the n-th parameter of the group now.
    """
    names = {param: name.replace(COMPILED, "") for name, param in model.named_parameters()}
    state, groups = {}, []
    for key, part in parts.items():
        own = saved[key] if key else saved
        for group, saved_group in zip(part.param_groups, own["param_groups"], strict=True):
            name_of = dict(zip(saved_group["params"], (names[p] for p in group["params"]), strict=True))
            state.update({name_of[n]: value for n, value in own["state"].items() if n in name_of})
            groups.append({**saved_group, "params": list(name_of.values())})
    return {"state": state, "param_groups": groups}


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
