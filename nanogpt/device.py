"""Choosing a device, a precision and whether to compile, with clear errors."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from nanogpt.errors import DeviceError
from nanogpt.options import check_choices, option

# device.dtype names; auto picks per device (resolve_dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DeviceConfig:
    """Which device to run on and how: precision and compilation."""

    name: str = option("auto", "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "compute precision; auto: bf16 (else fp16) on CUDA, float32 elsewhere",
                        choices=("auto", *DTYPES))
    compile: bool | None = option(None, "torch.compile the model; null: on CUDA only")
    peak_flops: float | None = option(None, "peak FLOP/s for MFU; null: looked up from the GPU's name")

    def __post_init__(self):
        check_choices(self)

# Dense bf16/fp16 tensor-core peaks (FLOP/s), for MFU. Matched against the GPU's name.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def resolve_device(name: str) -> torch.device:
    """Turn auto | cpu | cuda | cuda:N | mps into a torch.device that exists here.

    auto picks CUDA (which includes ROCm builds) over Apple's MPS over the CPU.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "device=cuda was asked for but no CUDA GPU is available; use device=cpu or device=auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device={name} was asked for but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device=mps was asked for but MPS is not available; use device=cpu or device=auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device={name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute precision: auto is bf16 on GPUs that have it, else fp16 on CUDA, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise DeviceError("device.dtype=float16 is not supported on the CPU; use float32 or bfloat16")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def should_compile(setting: bool | None, device: torch.device) -> bool:
    """torch.compile by default on CUDA only, where it pays off reliably."""
    return device.type == "cuda" if setting is None else setting


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak FLOP/s for MFU: configured, or looked up for known GPUs."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    gpu = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in gpu), None)
