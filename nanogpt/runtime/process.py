"""Where and how a run computes: its process in the job, its device, precision and compilation.

Runtime.start() turns a DeviceConfig into the settled facts (the CUDA device
this rank owns, bf16 or fp32, compile or not) and joins the torchrun job, if
any; new_model() makes a fresh model as this process holds it (whole, or only
its shards under FSDP2, sharding.py), and wrap() gives it the form the training
step calls (DDP across processes, then torch.compile). Training and the
benchmark share it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime import distributed, sharding
from nanogpt.runtime.device import (
    DeviceConfig,
    autocast,
    compile_mode,
    compiled,
    peak_flops,
    resolve_device,
    resolve_dtype,
    set_threads,
    should_compile,
)

log = logging.getLogger("nanogpt.train")


@dataclass
class Runtime:
    """The settled device facts of one training process."""

    dist: distributed.DistributedContext
    device: torch.device
    dtype: torch.dtype
    compile: bool
    peak_flops: float | None  # for MFU; None where the device's peak is unknown
    owns_process_group: bool = False
    vote: distributed.StopVote | None = None  # how the job's processes agree to stop
    sharded: bool = False  # FSDP: each process holds 1/N of the weights, gradients and optimizer state
    compile_mode: str | None = None  # torch.compile's: reduce-overhead replays CUDA graphs

    def __post_init__(self):
        self.vote = self.vote or distributed.StopVote(self.dist, self.device)

    @classmethod
    def start(cls, cfg: DeviceConfig, strategy: str = "ddp") -> Runtime:
        """Join the torchrun job (if any) and settle the device, precision, compilation and sharding."""
        context = distributed.context_from_environment()
        set_threads(cfg.threads)  # None: torch's default, one thread per core
        owns_group = distributed.init_process_group(context)
        distributed.silence_other_ranks(context)
        device = distributed.device_for(context, resolve_device(cfg.name))
        dtype, sharded = resolve_dtype(cfg.dtype, device), strategy == "fsdp" and context.enabled
        if sharded:
            sharding.check_precision(dtype)
            if device.type == "cpu":
                sharding.hand_back_freed_memory()
        elif strategy == "fsdp":  # a job of one (a laptop, a resume on fewer GPUs) runs as it would under ddp
            log.warning("distributed.strategy=fsdp in a single process shards nothing: training unsharded "
                        "(start it under torchrun to shard)")
        if device.type == "cpu" and should_compile(cfg.compile, device):
            # Compiled CPU kernels add some gradients (the embedding's) with atomic adds across
            # threads, in an order that varies; deterministic mode orders them, so that a resumed
            # run is bitwise the one that never stopped, as it is eagerly.
            torch.use_deterministic_algorithms(True, warn_only=True)
        # CUDA graphs cannot hold DDP's gradient all-reduce, which runs between the graph's kernels.
        mode = None if context.enabled else compile_mode(cfg.cuda_graphs, device)
        return cls(context, device, dtype, should_compile(cfg.compile, device),
                   peak_flops(device, cfg.peak_flops), owns_group, sharded=sharded, compile_mode=mode)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def new_model(self, config: GPTConfig) -> GPT:
        """A fresh GPT of config's shape as this process holds it, with the weights GPT(config) draws here.

        Sharded, the process allocates and fills only its shards of each weight
        (sharding.build), compiled block by block if compile: the whole model exists nowhere.
        """
        if self.sharded:
            return sharding.build(config, self.device, self.dtype, self.compile)
        return GPT(config)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the training step calls it: under DDP across processes, then compiled.

        A sharded model (from new_model) is already in its form.
        """
        if self.sharded:
            return model
        forward = model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if not self.compile:
            return forward
        forward = compiled(forward, "the training step", self.compile_mode)
        return GraphedSteps(forward) if self.compile_mode == "reduce-overhead" else forward

    def whole(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The model as one process can run it alone: itself; sharded, a whole copy on rank 0 (or None)."""
        return sharding.whole_copy(model, self.device, self.dist) if self.sharded else model

    def describe(self, model: torch.nn.Module) -> str:
        """How the job's processes hold model, in one line (for a job of several)."""
        count, processes = sum(p.numel() for p in model.parameters()), self.dist.world_size
        if self.sharded:
            return f"FSDP: sharding {count:,} parameters across {processes} processes"
        return f"DDP: {processes} processes, each holding all {count:,} parameters"

    def close(self) -> None:
        """Leave the torchrun job, if this runtime joined it."""
        self.vote.close()
        if self.owns_process_group:
            torch.distributed.destroy_process_group()
            self.owns_process_group = False


class GraphedSteps(torch.nn.Module):
    """A model compiled as CUDA graphs (reduce-overhead), each call of which begins a new graph step.

    A graph's outputs live in memory that its next replay writes over; telling
    torch that a new step begins lets it reuse that memory at once, since the
    training loop has read the last step's loss by then.
    """

    def __init__(self, step):
        super().__init__()
        self.step = step  # a CompiledOrEager: the graphs, or the model if they could not be made

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return self.step(*args, **kwargs)
