"""Choosing a device, a precision and whether to compile, with clear errors."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from nanogpt.errors import DeviceError
from nanogpt.options import check_choices, option, require

# device.dtype names; auto and fastest pick per device (resolve_dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PER_DEVICE_DTYPES = ("auto", "fastest")


@dataclass
class DeviceConfig:
    """Which device to run on and how: precision and compilation."""

    name: str = option("auto", "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "compute precision; auto: bf16 (else fp16) on CUDA, float32 elsewhere; "
                                "fastest: as auto, but bf16 also on CPUs with bf16 instructions",
                        choices=(*PER_DEVICE_DTYPES, *DTYPES))
    compile: bool | None = option(None, "torch.compile the model (training, and generation's one-token "
                                         "steps); null: on CUDA only")
    cuda_graphs: bool | None = option(None, "replay compiled steps as CUDA graphs (torch.compile's "
                                            "reduce-overhead mode), which removes the launch cost of "
                                            "every kernel; null: for generation only")
    peak_flops: float | None = option(None, "peak FLOP/s for MFU; null: looked up from the GPU's name")
    threads: int | None = option(None, "CPU threads torch computes with; null: all cores, "
                                       "shared out among the jobs a sweep runs side by side")

    def __post_init__(self):
        check_choices(self)
        require(self.threads is None or self.threads >= 1, f"device.threads={self.threads} must be >= 1")

# Dense (not 2:4-sparse) bf16/fp16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets, for MFU.
# Variants of one chip differ by up to a quarter (an H100 PCIe runs at 756 TFLOP/s, the SXM at
# 989), so a name is matched by whole words and the longest matching key wins: "H100 PCIe"
# before "H100", "L40S" and "L40" never taken for "L4", "A100" never for "A10".
GPU_PEAK_FLOPS = {
    "B200": 2250e12,
    "H200": 989e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "H100": 989e12,  # the SXM board, which CUDA names "H100 80GB HBM3"
    "H100 PCIE": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "H800 PCIE": 756e12,
    "A100": 312e12,  # SXM and PCIe alike
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10": 125e12,
    "A10G": 125e12,  # AWS's A10 variant; NVIDIA publishes no figure of its own for it
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # SXM2; fp16 (the V100 has no bf16)
    "V100 PCIE": 112e12,
    "T4": 65e12,
}


def gpu_peak_flops(name: str) -> float | None:
    """The peak for a CUDA device name (e.g. "NVIDIA H100 PCIe"), or None for a GPU not in the table.

    Dashes and underscores count as spaces ("A100-SXM4-80GB"), case is ignored,
    and a key matches only as whole words, so "L4" is not found in "L40S".
    """
    words = " " + re.sub(r"[-_\s]+", " ", name.upper()) + " "
    matches = [key for key in GPU_PEAK_FLOPS if f" {key} " in words]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


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


def set_threads(threads: int | None) -> None:
    """Compute with this many CPU threads; None keeps torch's default (one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


def bf16_instructions() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16); without, torch emulates it, slowly.

    torch's probe is private and absent from some builds; without it, the answer is no.
    """
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute precision: auto is bf16 on GPUs that have it, else fp16 on CUDA, else fp32.

    fastest is auto, except on a CPU with bfloat16 instructions: there bfloat16
    autocast halves the time of a small model's matrix products (attention stays
    float32, model.py), at the cost of results that are no longer bit-exact float32.
    """
    if name == "fastest" and device.type == "cpu" and bf16_instructions():
        return torch.bfloat16
    if name in PER_DEVICE_DTYPES:
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
    """torch.compile by default on CUDA only, where it pays off reliably.

    On a CPU, compiling takes longer than a sampling command or a short run saves
    with it; device.compile=true asks for it anyway.
    """
    return device.type == "cuda" if setting is None else setting


def compile_mode(graphs: bool | None, device: torch.device, generating: bool) -> str | None:
    """torch.compile's mode: reduce-overhead (CUDA graphs) where device.cuda_graphs asks for it.

    By default only generation's one-token steps are replayed as graphs: each is a
    few hundred small kernels, launch-bound on any GPU. Training steps have not yet
    been measured on a GPU with graphs (docs/benchmarks.md), so they stay plain.
    """
    wanted = generating if graphs is None else graphs
    return "reduce-overhead" if wanted and device.type == "cuda" else None


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak FLOP/s for MFU: configured, or looked up for known GPUs."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))
