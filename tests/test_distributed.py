"""Data-parallel training with torchrun: real processes, real gloo, on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogpt.dataset.batches import BatchSampler
from nanogpt.dataset.pipeline import prepare_data
from nanogpt.errors import ConfigError
from nanogpt.runtime.distributed import DistributedContext, per_rank_accumulation
from nanogpt.tracking.metrics import read_metrics
from tests.conftest import REPO, TINY_RUN
from tests.test_stops import Running

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


@pytest.mark.slow  # torchrun jobs
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


@pytest.mark.parametrize("total,processes,works", [
    (1, 2, "gradient_accumulation_steps=2"),
    (3, 2, "gradient_accumulation_steps=2 or gradient_accumulation_steps=4"),
    (10, 4, "gradient_accumulation_steps=8 or gradient_accumulation_steps=12"),
])
def test_a_total_the_processes_cannot_share_names_the_totals_that_work(total, processes, works):
    job = DistributedContext(world_size=processes)
    with pytest.raises(ConfigError) as refused:
        per_rank_accumulation(total, job)
    assert str(refused.value).endswith(
        f"so every process runs the same number of micro-batches: give {works} (any multiple of {processes})")
    assert per_rank_accumulation(total * processes, job) == total  # a total that divides is kept as given


@pytest.mark.slow  # torchrun jobs
def test_accumulation_not_divisible_by_processes_is_one_error_line(corpus, tmp_path, data_root):
    result = run([*TORCHRUN, "-m", "nanogpt.train", *DDP_RUN, "gradient_accumulation_steps=3",
                  "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}"], tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: gradient_accumulation_steps=3 must be a multiple of the number of processes "
                      "(2), so every process runs the same number of micro-batches: give "
                      "gradient_accumulation_steps=2 or gradient_accumulation_steps=4 (any multiple of 2)"]
    assert not list(tmp_path.rglob("config.yaml")), "no half-made run directory is left behind"


@pytest.mark.slow  # torchrun jobs
def test_gloo_rank_failure_before_training_does_not_hang(tmp_path):
    # A bad option fails while composing on rank 0; rank 1 must not wait for it forever.
    result = run([*TORCHRUN, "-m", "nanogpt.train", "model=huge"], tmp_path)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: model=huge is not an option; choose one of: " + ", ".join(sorted(
            p.stem for p in (Path(__file__).parent.parent / "conf" / "model").glob("*.yaml")))
    ]
    assert not (tmp_path / "outputs").exists()


# Dropout on: every rank's random state must be saved and restored for the runs to match.
STOP_RUN = [*DDP_RUN, "model.dropout=0.1", "logger=none"]


def torchrun(module: str, *args: str, cwd: Path, faults: str | None = None) -> subprocess.CompletedProcess:
    """Torchrun 2 gloo processes of module (tests.faults with faults patched in, if given)."""
    env_module = ["-m", "tests.faults", faults] if faults else ["-m", module]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([*TORCHRUN, *env_module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def stopped_ranks(result: subprocess.CompletedProcess) -> list[int]:
    """The exit codes torchrun reports for its failed workers."""
    return [int(line.split(":")[1].split()[0]) for line in result.stderr.splitlines()
            if line.strip().startswith("exitcode")]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)


@pytest.mark.slow  # torchrun jobs
def test_torchrun_stops_together_and_resumes_bitwise_exact(corpus, tmp_path, data_root):
    common = [*STOP_RUN, "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}"]
    reference = torchrun("nanogpt.train", *common, "hydra.run.dir=reference", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    expected = weights(tmp_path / "reference")

    # SIGTERM to rank 1 alone, during training; then SIGTERM to rank 0 alone, in the middle of an evaluation.
    for faults, stop_iter in (("signal_at_iter=5:SIGTERM@1", 6), ("signal_in_eval=4:SIGTERM@0", 4)):
        run_dir = tmp_path / faults.partition("=")[0]
        stopped = torchrun("nanogpt.train", *common, f"hydra.run.dir={run_dir}", cwd=tmp_path, faults=faults)
        assert stopped_ranks(stopped) == [143, 143], stopped.stderr  # every process, the same status
        assert "Traceback" not in stopped.stdout and stopped.stderr.count("Traceback") == 1  # torchrun's own
        assert stopped.stdout.count("stopped by SIGTERM") == 1
        assert f"resume with: torchrun --standalone --nproc_per_node=2 -m nanogpt.train resume={run_dir}" \
            in stopped.stdout
        assert sorted(p.name for p in run_dir.glob("*.pt*")) == ["best.pt", "last.pt"]
        saved = weights(run_dir)
        assert saved["iter_num"] == stop_iter and saved["training"]["world_size"] == 2
        ranks = saved["training"]["ranks"]
        assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])  # dropout differs per rank

        resumed = torchrun("nanogpt.train", f"resume={run_dir}", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        final = weights(run_dir)
        worst = max((final["model"][k] - expected["model"][k]).abs().max().item() for k in expected["model"])
        print(f"{faults}: stopped before {stop_iter}, resumed under torchrun: max |weight diff| {worst}")
        assert worst == 0.0 and final["iter_num"] == 8
        keys = [(r["kind"], r["iter"]) for r in read_metrics(run_dir)]
        assert len(keys) == len(set(keys)) and ("eval", 8) in keys


@pytest.mark.slow  # torchrun jobs
def test_resume_with_another_number_of_processes_is_one_line(corpus, tmp_path, data_root):
    run_dir = tmp_path / "one"
    single = run([sys.executable, "-m", "nanogpt.train", *STOP_RUN, "max_iters=2", "dataset=text",
                  f"dataset.source={corpus}", f"data_root={data_root}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert single.returncode == 0, single.stderr
    result = torchrun("nanogpt.train", f"resume={run_dir}", "max_iters=4", cwd=tmp_path)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: resume: the run was saved by 1 process(es) and this job has 2; resume it with as many "
        "(python -m nanogpt.train resume=...), or start a new run from its weights (model.init_from=RUN_DIR)"]
    assert weights(run_dir)["iter_num"] == 2  # untouched


@pytest.mark.slow  # torchrun jobs
@pytest.mark.parametrize("target", ["agent", "every rank"])
def test_sigterm_to_torchrun_or_all_its_ranks_saves_once_and_resume_finishes(target, corpus, tmp_path,
                                                                              data_root):
    run_dir = tmp_path / "run"
    args = [*STOP_RUN, "max_iters=100000", "eval_interval=100000", "dataset=text", f"dataset.source={corpus}",
            f"data_root={data_root}", f"hydra.run.dir={run_dir}"]
    job = Running([*TORCHRUN, "-m", "nanogpt.train", *args], tmp_path)
    job.wait_for("iter 10:")
    workers = job.children()
    assert len(workers) == 2
    if target == "agent":
        latency = job.stop(signal.SIGTERM)  # torchrun passes it on to every worker
    else:  # as SLURM does on preemption: every process of the step at nearly the same moment
        os.kill(workers[1], signal.SIGTERM)
        latency = job.stop(signal.SIGTERM, pid=workers[0])
    print(f"SIGTERM to {target} of a 2-process torchrun job: torchrun exited {latency:.2f} s later")
    assert job.process.returncode != 0
    stops = [line for line in job.stdout if line.startswith("stopped by")]
    assert len(stops) == 1 and stops[0].startswith("stopped by SIGTERM before iteration ")
    assert sum("SIGTERM received" in line for line in job.stdout + job.stderr) == 1  # rank 0 alone says it
    assert sorted(p.name for p in run_dir.glob("*.pt*")) == ["best.pt", "last.pt"]
    saved = weights(run_dir)
    assert saved["iter_num"] > 10 and saved["training"]["world_size"] == 2
    assert f"before iteration {saved['iter_num']}:" in stops[0]

    more = f"max_iters={saved['iter_num'] + 3}"
    resumed = torchrun("nanogpt.train", f"resume={run_dir}", more, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert weights(run_dir)["iter_num"] == saved["iter_num"] + 3
    assert (resumed.stdout + resumed.stderr).count(f"resuming {run_dir} from iteration") == 1  # rank 0's

    if target == "agent":  # resumed again, finished: every rank ends at once, with rank 0's one line
        before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        again = torchrun("nanogpt.train", f"resume={run_dir}", more, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        end, best = saved["iter_num"] + 3, weights(run_dir)["best_val_loss"]
        assert [line for line in again.stdout.splitlines() if "has finished" in line] == [
            f"{run_dir} has finished: it trained to iteration {end} and evaluated there (best val loss "
            f"{best:.4f}); nothing to do, so nothing was changed. To train it further, raise max_iters: "
            f"torchrun --standalone --nproc_per_node=2 -m nanogpt.train resume={run_dir} max_iters=N "
            f"(N above {end})"]
        assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow  # torchrun jobs
def test_a_user_error_on_one_rank_reaches_the_user(corpus, tmp_path, data_root):
    result = torchrun("nanogpt.train", *STOP_RUN, "dataset=text", f"dataset.source={corpus}",
                      f"data_root={data_root}", "hydra.run.dir=run", cwd=tmp_path,
                      faults="data_error_on_rank=1")
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: rank 1: dataset.source={corpus} does not exist on this node"]
    assert 2 in stopped_ranks(result)
    assert "Traceback" not in result.stdout and result.stderr.count("Traceback") == 1  # torchrun's own
