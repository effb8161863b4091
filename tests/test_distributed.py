"""Data-parallel training with torchrun: real processes, real gloo, on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from nanogpt.data import BatchSampler, prepare_data
from nanogpt.tracking import read_metrics
from tests.conftest import TINY_RUN

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# Learning fast enough that the weights really move, so the curves could really differ.
DDP_RUN = [*TINY_RUN, "log_interval=1", "max_iters=8", "eval_interval=4", "eval_iters=4",
           "optimizer.lr=1e-2", "optimizer.warmup_iters=0", "gradient_accumulation_steps=4",
           "sample_tokens=0"]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with the test environment; return the completed process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_rank_draws_its_own_share_of_the_single_process_batches(corpus, data_root):
    data = prepare_data("c", str(corpus), data_root)
    single = BatchSampler(data, 16, 4, torch.device("cpu"), seed=3)
    ranks = [BatchSampler(data, 16, 4, torch.device("cpu"), seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        expected = torch.cat([single.get_batch("train")[0] for _ in range(2)])
        shares = [sampler.get_batch("train")[0] for sampler in ranks]
        assert not torch.equal(shares[0], shares[1])
        assert torch.equal(torch.cat(shares), expected)


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(corpus, tmp_path, data_root):
    common = [*DDP_RUN, "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}"]
    single = run([sys.executable, "-m", "nanogpt.train", *common, "hydra.run.dir=single"], tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = run([*TORCHRUN, "-m", "nanogpt.train", *common], tmp_path)
    assert ddp.returncode == 0, ddp.stderr

    # One run directory for the job (Hydra's timestamped default), written by rank 0 only.
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob("config.yaml") if p.parent.name != ".hydra"]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["best.pt", "last.pt"]
    # One run directory and nothing beside it: outputs/<date>/<time>, made by rank 0 only.
    (date_dir,) = (tmp_path / "outputs").iterdir()
    assert list(date_dir.iterdir()) == [run_dir]
    log = (run_dir / "train.log").read_text()
    assert log.count("eval 0:") == 1 and log.count("iter 7:") == 1

    curves = {name: read_metrics(path) for name, path in (("single", tmp_path / "single"), ("ddp", run_dir))}
    assert [r["kind"] for r in curves["ddp"]] == [r["kind"] for r in curves["single"]]
    differences = []
    for one, two in zip(curves["single"], curves["ddp"], strict=True):
        for key in ("loss", "train_loss", "val_loss"):
            if key in one:
                differences.append(abs(one[key] - two[key]))
    train_losses = [r["loss"] for r in curves["single"] if r["kind"] == "train"]
    print(f"2-process DDP vs 1 process, {len(differences)} loss values: "
          f"max |difference| = {max(differences):.2e}; "
          f"loss went {train_losses[0]:.4f} -> {train_losses[-1]:.4f}")
    assert train_losses[-1] < train_losses[0] - 0.1  # the weights really moved
    assert max(differences) < 1e-4

    weights = [torch.load(d / "last.pt", weights_only=True)["model"] for d in (tmp_path / "single", run_dir)]
    worst = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    print(f"final weights: max |difference| = {worst:.2e}")
    assert worst < 1e-4


def test_accumulation_not_divisible_by_processes_is_one_error_line(corpus, tmp_path, data_root):
    result = run([*TORCHRUN, "-m", "nanogpt.train", *DDP_RUN, "gradient_accumulation_steps=3",
                  "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}"], tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: gradient_accumulation_steps=3 must be a multiple of the number of processes "
                      "(2), so every process runs the same number of micro-batches"]
    assert not list(tmp_path.rglob("config.yaml")), "no half-made run directory is left behind"


def test_gloo_rank_failure_before_training_does_not_hang(tmp_path):
    # A bad option fails while composing on rank 0; rank 1 must not wait for it forever.
    result = run([*TORCHRUN, "-m", "nanogpt.train", "model=huge"], tmp_path)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: model=huge is not an option; choose one of: " + ", ".join(sorted(
            p.stem for p in (Path(__file__).parent.parent / "conf" / "model").glob("*.yaml")))
    ]
    assert not (tmp_path / "outputs").exists()
