"""Choosing a device, a precision and whether to compile, with clear errors."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanogpt.errors import DeviceError, first_line
from nanogpt.options import check_choices, option, require

# device.dtype names; auto and fastest pick per device (resolve_dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PER_DEVICE_DTYPES = ("auto", "fastest")
log = logging.getLogger("nanogpt.device")


@dataclass
class DeviceConfig:
    """Which device to run on and how: precision and compilation."""

    name: str = option("auto", "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "compute precision; auto: bf16 (else fp16) on CUDA, float32 elsewhere; "
                                "fastest: as auto, but bf16 also on CPUs with bf16 instructions",
                        choices=(*PER_DEVICE_DTYPES, *DTYPES))
    compile: bool | None = option(None, "torch.compile the model (training, and generation's one-token "
                                         "steps); null: training on CUDA, measured on a GPU; generation's "
                                         "compiled step is not yet measured on one, so it stays off. A "
                                         "compile that fails warns once and goes on eagerly")
    cuda_graphs: bool | None = option(None, "replay compiled steps as CUDA graphs (torch.compile's "
                                            "reduce-overhead mode), which removes the launch cost of "
                                            "every kernel; null: off, as no GPU has measured it yet")
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


def should_compile(setting: bool | None, device: torch.device, generating: bool = False) -> bool:
    """Whether to torch.compile: as device.compile says; by default only what a GPU has measured.

    Training compiled on CUDA was measured faster (docs/benchmarks.md), so it is CUDA's
    default; generation's compiled one-token step has not been measured on a GPU yet, so it
    waits for device.compile=true. On a CPU, compiling takes longer than a sampling command or
    a short run saves with it.
    """
    if setting is not None:
        return setting
    return device.type == "cuda" and not generating


def compile_mode(graphs: bool | None, device: torch.device) -> str | None:
    """torch.compile's mode: reduce-overhead (CUDA graphs) where device.cuda_graphs asks for it.

    Off by default: neither training steps nor generation's one-token steps have been
    measured on a GPU as graphs yet (docs/benchmarks.md).
    """
    return "reduce-overhead" if graphs and device.type == "cuda" else None


class CompiledOrEager:
    """A compiled callable that goes on eagerly, for good, the first time compiling or capturing it fails.

    torch.compile compiles at the first call (and again whenever a guard fails), and a
    CUDA graph is captured during the first calls, so a failure comes from a call, not
    from torch.compile(): this wraps the calls. A failure (a missing C++ compiler, a graph
    break under fullgraph, a refused capture, the recompile limit) is one warning that
    names it and the switch that turns the path off; the call is then made eagerly. An
    error that the eager call raises too is not the compiler's: it is raised as it is.
    Nothing is lost by the retry: a compile fails before its code runs, and a capture
    records kernels without running them. Attributes not its own are the eager callable's
    (DDP's no_sync, for one).
    """

    def __init__(self, compiled: Callable, eager: Callable, what: str, switch: str):
        self.compiled, self.eager, self.what, self.switch = compiled, eager, what, switch
        self.failed: str | None = None  # why it went eager, once it has

    def __call__(self, *args, **kwargs):
        if self.failed is not None:
            return self.eager(*args, **kwargs)
        try:
            # Past the recompile limit dynamo would quietly run the rest eagerly, uncompiled,
            # frame by frame; raising instead lets it be said once.
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 (whose failure it was, the eager call tells)
            failure = f"{type(error).__name__}: {first_line(str(error))[:300]}"
        result = self.eager(*args, **kwargs)  # raises the error if it is not the compiler's
        self.failed = failure
        if (self.what, failure) not in WARNED:  # the blocks of a sharded model fail alike: said once
            WARNED.add((self.what, failure))
            log.warning("%s failed to compile or capture (%s); going on without compiling (%s turns "
                        "it off)", self.what, failure, self.switch)
        return result

    def __getattr__(self, name: str):
        return getattr(self.eager, name)


WARNED: set[tuple[str, str]] = set()  # (what, why) this process has said failed to compile


class CompiledModule(torch.nn.Module):
    """A module compiled in place of itself, falling back to itself (CompiledOrEager) if that fails.

    A module, so that FSDP can shard it as a unit; its parameters are named as under
    torch.compile's own wrapper (``_orig_mod.``), so checkpoints read them alike.
    """

    def __init__(self, module: torch.nn.Module, what: str, mode: str | None = None):
        super().__init__()
        self._orig_mod = module
        self.call = compiled(module, what, mode)

    def forward(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def compiled(model: Callable, what: str, mode: str | None, **options) -> CompiledOrEager:
    """torch.compile(model, mode=mode, **options), falling back to model itself if that fails at a call."""
    switch = "device.cuda_graphs=false or device.compile=false" if mode else "device.compile=false"
    return CompiledOrEager(torch.compile(model, mode=mode, **options), model, what, switch)


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak FLOP/s for MFU: configured, or looked up for known GPUs."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))
