"""Performance plumbing that must be right before any figure means anything: GPU peaks and sweep threads."""

import os
import subprocess
import sys

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from nanogpt.errors import ConfigError
from nanogpt.runtime.device import DeviceConfig, gpu_peak_flops, set_threads
from nanogpt.train import share_cores


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989),  # the SXM board
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA A10G", 125),
    ("NVIDIA L40S", 362),
    ("NVIDIA L40", 181),
    ("NVIDIA L4", 121),
    ("Tesla V100-PCIE-32GB", 112),
    ("Tesla V100-SXM2-16GB", 125),
    ("NVIDIA GeForce RTX 4090", 165),
    ("Tesla T4", 65),
])
def test_each_gpu_variant_gets_its_own_peak(name, tflops):
    assert gpu_peak_flops(name) == tflops * 1e12


@pytest.mark.parametrize("name", ["NVIDIA RTX A6000", "AMD Instinct MI300X", "NVIDIA L4000", ""])
def test_unknown_gpus_get_no_peak_rather_than_a_wrong_one(name):
    assert gpu_peak_flops(name) is None


@pytest.fixture
def in_hydra_job(monkeypatch):
    """A setter that makes HydraConfig.get() answer as inside a job of a given mode and launcher."""
    def set_job(mode: RunMode, launcher: dict) -> None:
        config = OmegaConf.create({"mode": mode, "launcher": launcher})
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: config))
    return set_job


@pytest.fixture
def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_parallel_sweep_jobs_share_the_cores(in_hydra_job, cores):
    in_hydra_job(RunMode.MULTIRUN, {"n_jobs": 2})
    assert share_cores(DeviceConfig()).threads == max(1, cores // 2)
    in_hydra_job(RunMode.MULTIRUN, {"n_jobs": -1})  # joblib: as many jobs as cores
    assert share_cores(DeviceConfig()).threads == 1
    in_hydra_job(RunMode.MULTIRUN, {"n_jobs": 4 * cores})
    assert share_cores(DeviceConfig()).threads == 1


def test_threads_stay_torch_default_outside_parallel_sweeps_and_when_set(in_hydra_job):
    in_hydra_job(RunMode.RUN, {})
    assert share_cores(DeviceConfig()).threads is None
    in_hydra_job(RunMode.MULTIRUN, {"_target_": "basic"})  # jobs one after another
    assert share_cores(DeviceConfig()).threads is None
    in_hydra_job(RunMode.MULTIRUN, {"n_jobs": 2})
    assert share_cores(DeviceConfig(threads=3)).threads == 3  # the user's choice wins


def test_threads_must_be_positive():
    with pytest.raises(ConfigError, match="device.threads=0"):
        DeviceConfig(threads=0)


def test_set_threads_sets_torch_threads_and_none_keeps_them():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


EXIT_PROBE = """
import sys
class Cycle:
    def __del__(self):
        print("collected at exit", flush=True)
keep = Cycle()
keep.self = keep  # only Python's garbage collector frees a reference cycle
{entry_point}
"""


SAMPLE_HELP = "import nanogpt.sample; sys.argv[1:] = ['--help']; nanogpt.sample.main()"


@pytest.mark.parametrize("entry_point", ["", SAMPLE_HELP], ids=["plain python", "after an entry point"])
def test_entry_points_exit_without_the_last_garbage_collection(entry_point):
    # The last collection walks every object torch created (0.5-0.8 s per command); entry points skip it.
    probe = subprocess.run([sys.executable, "-c", EXIT_PROBE.format(entry_point=entry_point)],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert ("collected at exit" in probe.stdout) == (entry_point == "")
