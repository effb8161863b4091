import math
import platform
from pathlib import Path

import pytest
import torch

from nanogpt.errors import DeviceError
from nanogpt.runtime.device import (
    bf16_instructions,
    compile_mode,
    resolve_device,
    resolve_dtype,
    should_compile,
)
from nanogpt.training.optim import OptimizerConfig, learning_rate_at


def test_schedule_warmup_peak_and_end():
    opt = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100)
    assert learning_rate_at(0, opt, 2000) == pytest.approx(1e-3 / 101)
    assert learning_rate_at(99, opt, 2000) == pytest.approx(1e-3 * 100 / 101)
    assert learning_rate_at(100, opt, 2000) == pytest.approx(1e-3)  # peak right after warmup
    mid = 100 + (2000 - 100) // 2
    assert learning_rate_at(mid, opt, 2000) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate_at(2000, opt, 2000) == pytest.approx(1e-4)
    assert learning_rate_at(5000, opt, 2000) == pytest.approx(1e-4)
    lrs = [learning_rate_at(i, opt, 2000) for i in range(100, 2001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay


def test_schedule_options():
    opt = OptimizerConfig(lr=1e-3, min_lr=0.0, warmup_iters=0, lr_decay_iters=10)
    assert learning_rate_at(5, opt, 1000) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi / 2)))
    assert learning_rate_at(10, opt, 1000) == 0.0
    flat = OptimizerConfig(lr=2e-4, decay_lr=False)
    assert learning_rate_at(0, flat, 10) == learning_rate_at(9, flat, 10) == 2e-4


def test_device_resolution_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert should_compile(None, torch.device("cpu")) is False
    assert should_compile(None, torch.device("cuda")) is True
    assert should_compile(True, torch.device("cpu")) is True
    # Only what a GPU has measured is a default: compiled training, not the compiled one-token step
    # nor CUDA graphs (docs/benchmarks.md).
    cuda = torch.device("cuda")
    assert should_compile(None, cuda, generating=True) is False
    assert should_compile(True, cuda, generating=True) is True
    assert compile_mode(None, cuda) is None and compile_mode(True, cuda) == "reduce-overhead"
    assert compile_mode(True, torch.device("cpu")) is None


def test_fastest_dtype_is_bfloat16_exactly_on_cpus_that_have_its_instructions():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and platform.machine() == "x86_64":  # the kernel's own list of CPU features
        assert bf16_instructions() == ("avx512_bf16" in cpuinfo.read_text().split())
    expected = torch.bfloat16 if bf16_instructions() else torch.float32
    assert resolve_dtype("fastest", torch.device("cpu")) == expected
    assert resolve_dtype("fastest", torch.device("mps")) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="device=cuda"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the error where MPS is absent")
def test_missing_mps_is_a_clear_error():
    with pytest.raises(DeviceError, match="device=mps"):
        resolve_device("mps")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(DeviceError, match="tpu"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="float16"):
        resolve_dtype("float16", torch.device("cpu"))
