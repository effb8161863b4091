"""Where and how a run computes: its process in the job, its device, precision and compilation.

Runtime.start() turns a DeviceConfig into the settled facts (the CUDA device
this rank owns, bf16 or fp32, compile or not) and joins the torchrun job, if
any; wrap() gives the model the form the training step calls (DDP across
processes, then torch.compile). Training and the benchmark share it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from nanogpt.runtime import distributed
from nanogpt.runtime.device import (
    DeviceConfig,
    autocast,
    compile_mode,
    peak_flops,
    resolve_device,
    resolve_dtype,
    set_threads,
    should_compile,
)


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
    compile_mode: str | None = None  # torch.compile's: reduce-overhead replays CUDA graphs

    def __post_init__(self):
        self.vote = self.vote or distributed.StopVote(self.dist, self.device)

    @classmethod
    def start(cls, cfg: DeviceConfig) -> Runtime:
        """Join the torchrun job (if any) and settle the device, precision and compilation."""
        context = distributed.context_from_environment()
        set_threads(cfg.threads)  # None: torch's default, one thread per core
        owns_group = distributed.init_process_group(context)
        distributed.silence_other_ranks(context)
        device = distributed.device_for(context, resolve_device(cfg.name))
        if device.type == "cpu" and should_compile(cfg.compile, device):
            # Compiled CPU kernels add some gradients (the embedding's) with atomic adds across
            # threads, in an order that varies; deterministic mode orders them, so that a resumed
            # run is bitwise the one that never stopped, as it is eagerly.
            torch.use_deterministic_algorithms(True, warn_only=True)
        return cls(context, device, resolve_dtype(cfg.dtype, device), should_compile(cfg.compile, device),
                   peak_flops(device, cfg.peak_flops), owns_group,
                   compile_mode=compile_mode(cfg.cuda_graphs, device, generating=False))

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the training step calls it: under DDP across processes, then compiled."""
        forward = model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return torch.compile(forward, mode=self.compile_mode) if self.compile else forward

    def close(self) -> None:
        """Leave the torchrun job, if this runtime joined it."""
        self.vote.close()
        if self.owns_process_group:
            torch.distributed.destroy_process_group()
            self.owns_process_group = False
