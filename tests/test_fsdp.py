"""Sharded training (distributed.strategy=fsdp): real torchrun processes, gloo, FSDP2 and DCP, on the CPU.

The two runs of `pair` (DDP and FSDP, 2 processes, the same seed and global batch,
dropout on) are shared by the tests that only read them; tests that continue a
run work on a copy. Torchrun jobs: the slow tier (README "Tests"); what needs
no second process (building a model on the meta device and filling it, the
refusals) is in the quick one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.model import GPT, GPTConfig
from nanogpt.runtime import deferred_init, sharding
from nanogpt.runtime.distributed import DistributedConfig
from nanogpt.tracking.metrics import read_metrics
from nanogpt.training.config import TrainConfig
from nanogpt.weights import sharded
from nanogpt.weights.checkpoint import load_checkpoint, with_weights
from nanogpt.weights.huggingface import export_model, read_hf_directory
from nanogpt.weights.loading import load_pretrained, resolve_source
from nanogpt.weights.lora import LoraConfig
from tests.conftest import REPO, TINY_RUN

# Learning fast enough that the runs could really drift apart; dropout on, so every
# process's random state matters; four micro-batches a step, two on each process.
RUN = [*TINY_RUN, "log_interval=1", "max_iters=8", "eval_interval=4", "optimizer.lr=1e-2",
       "optimizer.warmup_iters=0", "gradient_accumulation_steps=4", "model.dropout=0.1",
       "model.gradient_checkpointing=true", "eval_tasks=[bpb]", "logger=none"]
FSDP = "distributed.strategy=fsdp"
slow = pytest.mark.slow  # torchrun jobs


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run command (this checkout's code, one thread a process); return the finished process."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def launch(*args: str, cwd: Path, processes: int = 2, faults: str | None = None):
    """nanogpt.train under torchrun (python alone for one process), with tests.faults' faults if given."""
    module = ["-m", "tests.faults", faults] if faults else ["-m", "nanogpt.train"]
    starter = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return run([*starter, *module, *args], cwd)


def copy_run(run_dir: Path, to: Path) -> Path:
    """A copy of a finished run to continue, without its owner's lock."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".run.lock"))
    return to


def losses(run_dir: Path) -> dict[tuple, float]:
    """Every number a run logged, by (kind, iteration, key)."""
    return {(r["kind"], r["iter"], key): r[key] for r in read_metrics(run_dir)
            for key in ("loss", "train_loss", "val_loss", "bpb") if key in r}


def whole(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under key ("model", or a sharded one's "optimizer"), whole."""
    state = load_checkpoint(path)
    return sharded.read_whole(Path(state["shards"]), path, key) if "shards" in state else state[key]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """The same 8 steps trained by 2 processes under DDP and under FSDP: where, and with what."""
    where = tmp_path_factory.mktemp("fsdp")
    lines = [f"{name}: I am {name}, and I speak of {thing}.\n"
             for name in ("ROMEO", "JULIET", "MERCUTIO", "NURSE")
             for thing in ("love", "the moon", "swords", "the night", "Verona")]
    (where / "corpus.txt").write_text("".join(lines) * 100)
    common = [*RUN, "dataset=text", f"dataset.source={where / 'corpus.txt'}", f"data_root={where / 'data'}"]
    results = {name: launch(*common, *extra, f"hydra.run.dir={name}", cwd=where)
               for name, extra in (("ddp", []), ("fsdp", [FSDP]))}
    for result in results.values():
        assert result.returncode == 0, result.stderr
    return {"where": where, "common": common, "ddp_stdout": results["ddp"].stdout,
            "fsdp_stdout": results["fsdp"].stdout}


@slow
def test_fsdp_trains_as_ddp_does_and_each_process_keeps_half(pair):
    where = pair["where"]
    ddp, fsdp = losses(where / "ddp"), losses(where / "fsdp")
    assert ddp.keys() == fsdp.keys() and ("eval", 8, "bpb") in fsdp  # eval_tasks score under FSDP too
    # The same starting weights (each FSDP process built only its shards): the first numbers, bitwise.
    first = [k for k in ddp if k[1] == 0]
    assert len(first) == 4 and all(ddp[k] == fsdp[k] for k in first)
    # Each run says once (rank 0 alone) how its processes hold the model.
    assert [line.split("] ")[-1] for line in pair["fsdp_stdout"].splitlines() if "FSDP:" in line] == [
        "FSDP: sharding 27,648 parameters across 2 processes"]
    assert [line.split("] ")[-1] for line in pair["ddp_stdout"].splitlines() if "DDP:" in line] == [
        "DDP: 2 processes, each holding all 27,648 parameters"]
    worst = max(abs(ddp[k] - fsdp[k]) for k in ddp)
    weights = [whole(where / run / "last.pt") for run in ("ddp", "fsdp")]
    worst_weight = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    print(f"FSDP vs DDP, 2 processes, 8 steps with dropout: {len(ddp)} logged values, max |difference| "
          f"{worst:.1e}; final weights max |difference| {worst_weight:.1e}")
    assert worst < 1e-5 and worst_weight < 1e-4
    assert fsdp[("train", 7, "loss")] < fsdp[("train", 0, "loss")] - 0.3  # the weights really moved
    assert "sample:" in pair["fsdp_stdout"]  # the end-of-run sample, from the gathered weights

    # Each process wrote its own half of the weights and optimizer state; last.pt holds none of them.
    state = load_checkpoint(where / "fsdp" / "last.pt")
    shards = sorted(Path(state["shards"]).glob("*.distcp"))
    sizes = [p.stat().st_size for p in shards]
    print(f"shards of last.pt: {sizes} bytes; last.pt itself {(where / 'fsdp' / 'last.pt').stat().st_size}")
    assert len(shards) == 2 and all(0.4 < size / sum(sizes) < 0.6 for size in sizes)
    assert "model" not in state and set(state["optimizer"]) == {"param_groups"}
    assert sorted(p.name.split(".")[0] for p in (where / "fsdp").glob("*.shards.*")) == ["best", "last"]


@slow
def test_a_sharded_run_is_read_directly_by_every_command(pair, tmp_path):
    where = pair["where"]
    run_dir = where / "fsdp"
    expected = whole(where / "ddp" / "best.pt")
    source = resolve_source(run_dir)  # what nanogpt.load, sample, eval and export read
    for loaded in (source.model, load_pretrained(str(run_dir))[0]):  # and what model.init_from starts from
        worst = max((loaded.state_dict()[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-4
    exported, _ = read_hf_directory(export_model(source.model, source.tokenizer, tmp_path / "hf"))
    assert torch.equal(exported.state_dict()["lm_head.weight"], source.model.lm_head.weight)

    sample = run([sys.executable, "-m", "nanogpt.sample", f"ckpt={run_dir}", "num_tokens=20"], tmp_path)
    # Nothing on stderr but which checkpoint was sampled: no warning, no notice.
    assert sample.returncode == 0 and ": iteration " in sample.stderr, sample.stderr
    assert len(sample.stderr.strip().splitlines()) == 1, sample.stderr


@slow
def test_stopped_or_killed_mid_save_a_sharded_run_resumes_bitwise(pair, tmp_path):
    where, common = pair["where"], pair["common"]
    expected = {key: whole(where / "fsdp" / "last.pt", key) for key in ("model", "optimizer")}
    # SIGTERM to rank 1 alone before step 5: every process stops after it and writes its shards.
    # SIGKILL while rank 0 writes the second last.pt: the new shards are on disk, not yet named.
    for faults, saved_at in (("signal_at_iter=5:SIGTERM@1", 6), ("kill_during_save=2", 0)):
        run_dir = tmp_path / faults.partition("=")[0]
        stopped = launch(*common, FSDP, f"hydra.run.dir={run_dir}", cwd=where, faults=faults)
        assert stopped.returncode != 0
        assert load_checkpoint(run_dir / "last.pt")["iter_num"] == saved_at
        if saved_at:
            again = f"torchrun --standalone --nproc_per_node=2 -m nanogpt.train resume={run_dir}"
            assert f"resume with: {again}" in stopped.stdout
        resumed = launch(f"resume={run_dir}", cwd=where)
        assert resumed.returncode == 0, resumed.stderr
        for key, tensors in expected.items():
            final = whole(run_dir / "last.pt", key)
            assert final.keys() == tensors.keys()
            assert all(torch.equal(final[k], tensors[k]) for k in tensors), (faults, key)
        assert len(list(run_dir.glob("last.shards.*"))) == 1  # the uncommitted folder is gone


@slow
def test_saved_by_four_processes_resumed_by_two_or_one(pair, tmp_path):
    where, common = pair["where"], pair["common"]
    four = tmp_path / "four"
    stopped = launch(*common, FSDP, f"hydra.run.dir={four}", cwd=where, processes=4,
                     faults="signal_at_iter=3:SIGTERM")
    assert load_checkpoint(four / "last.pt")["iter_num"] == 4, stopped.stderr
    assert len(list(Path(load_checkpoint(four / "last.pt")["shards"]).glob("*.distcp"))) == 4
    curves = {}
    for processes in (2, 1):
        run_dir = copy_run(four, tmp_path / f"by{processes}")
        resumed = launch(f"resume={run_dir}", cwd=where, processes=processes)
        assert resumed.returncode == 0, resumed.stderr
        curves[processes] = {k: v for k, v in losses(run_dir).items() if k[1] >= 4}
        if processes == 1:  # a job of one shards nothing, and says so
            assert [line for line in resumed.stdout.splitlines() if "shards nothing" in line] == [
                "distributed.strategy=fsdp in a single process shards nothing: training unsharded "
                "(start it under torchrun to shard)"]
            assert not list(run_dir.glob("*.shards.*"))  # its checkpoints are whole again
    by2, by1 = curves[2], curves[1]
    # Both evaluate the weights they read first, on the same batches: the same weights, read at two sizes.
    first = [k for k in by2 if k[:2] == ("eval", 4)]
    assert len(first) == 3 and max(abs(by2[k] - by1[k]) for k in first) < 1e-5
    # Then each process draws its batches and dropout afresh; the loss goes on falling alike.
    later = max(abs(by2[k] - by1[k]) for k in by2)
    val = [by2[("eval", it, "val_loss")] for it in (4, 8)]
    print(f"saved by 4 processes, resumed by 2 and by 1: evaluation at 4 equal within 1e-5, later losses "
          f"within {later:.3f}; val loss {val[0]:.3f} -> {val[1]:.3f}")
    assert by2.keys() == by1.keys() and later < 0.05 and val[1] < val[0] - 0.1


@slow
def test_ddp_and_fsdp_resume_each_other(pair, tmp_path):
    where = pair["where"]
    results = {}
    for source, strategy in (("ddp", "fsdp"), ("fsdp", "ddp")):
        run_dir = copy_run(where / source, tmp_path / f"{source}_to_{strategy}")
        resumed = launch(f"resume={run_dir}", "max_iters=10", f"distributed.strategy={strategy}", cwd=where)
        assert resumed.returncode == 0, resumed.stderr
        results[strategy] = {k: v for k, v in losses(run_dir).items() if k[1] >= 8}
    assert results["fsdp"].keys() == results["ddp"].keys() and len(results["fsdp"]) > 3
    assert max(abs(results["fsdp"][k] - results["ddp"][k]) for k in results["fsdp"]) < 1e-5


@slow
def test_muon_under_fsdp_takes_ddps_steps(pair, tmp_path):
    where = pair["where"]
    common = [*pair["common"], "optimizer=muon", "max_iters=4", "eval_interval=4", "eval_tasks=[]"]
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", [FSDP])):
        result = launch(*common, *extra, f"hydra.run.dir={tmp_path / name}", cwd=where)
        assert result.returncode == 0, result.stderr
        runs[name] = losses(tmp_path / name)
    # Muon's Newton-Schulz iteration magnifies float rounding (FSDP sums gradients in another order).
    assert max(abs(runs["ddp"][k] - runs["fsdp"][k]) for k in runs["ddp"]) < 1e-3


@slow
def test_sharded_models_start_from_one_processs_weights(pair, tmp_path):
    """Built shard by shard on 3 processes (rows that do not divide evenly), fresh or from init_from."""
    where, out = pair["where"], tmp_path / "found.json"
    source = resolve_source(where / "ddp")
    hf = export_model(source.model, source.tokenizer, tmp_path / "hf")
    sources = [where / "ddp", where / "fsdp", hf]  # a whole .pt, a sharded run, a Hugging Face directory
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                  "-m", "tests.sharded_init", str(out), *map(str, sources)], where)
    assert result.returncode == 0, result.stderr
    found = json.loads(out.read_text())
    assert found.pop("processes") == 3 and len(found) == 5
    for case, record in found.items():
        print(f"{case}: this process holds {record['held']:.3f} of the weights")
        assert record["different"] == [], case  # every weight bitwise one process's
        assert record["generator_as_after_one_process"] and record["tied"] and record["buffers_equal"], case
        assert 0.3 < record["held"] < 0.37, case  # a third each (rank 0 has the rounded-up rows)


def test_a_model_built_on_the_meta_device_is_filled_with_one_processs_weights():
    """deferred_init: the constructor's initialiser calls, made again later, give GPT(config)'s weights."""
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, position_encoding="rope",
                       vocab_multiple=64, zero_init_proj=True)
    torch.manual_seed(3)
    whole, after = GPT(config), torch.get_rng_state()
    torch.manual_seed(3)
    deferred = deferred_init.build(lambda: GPT(config))
    assert all(p.is_meta for p in deferred.model.parameters())  # shapes, no memory
    assert not any(b.is_meta for b in deferred.model.buffers())  # the rotary tables are computed
    torch.manual_seed(99)  # whatever draws come between, the fill draws as the constructor would have
    filled = {}
    deferred.fill(filled.__setitem__)  # each weight's last fill is its value
    assert filled.keys() == dict(whole.named_parameters()).keys()
    assert all(torch.equal(value, whole.state_dict()[name]) for name, value in filled.items())
    assert torch.equal(torch.get_rng_state(), after)  # and leaves the generator where GPT(config) does

    class ChangedInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(4))
            nn.init.zeros_(self.weight)
            with torch.no_grad():
                self.weight.add_(1)  # depends on what the weight held: no whole-tensor fill replays it

    with pytest.raises(RuntimeError, match="add_ changes a weight in place while the model is built"):
        deferred_init.build(ChangedInPlace)


def test_what_cannot_be_sharded_is_refused_in_one_line():
    with pytest.raises(ConfigError) as lora:
        TrainConfig(lora=LoraConfig(rank=8), distributed=DistributedConfig(strategy="fsdp"))
    assert str(lora.value).startswith("lora.rank=8 with distributed.strategy=fsdp: LoRA keeps gradients")
    with pytest.raises(ConfigError, match="device.dtype=float32, or distributed.strategy=ddp"):
        sharding.check_precision(torch.float16)
    with pytest.raises(ConfigError, match="strategy='zero3' is not one of ddp, fsdp"):
        DistributedConfig(strategy="zero3")


@slow
def test_a_missing_or_foreign_shard_is_named(pair, tmp_path):
    run_dir = copy_run(pair["where"] / "fsdp", tmp_path / "run")
    folder = Path(load_checkpoint(run_dir / "best.pt")["shards"])
    (folder / "__1_0.distcp").unlink()
    result = run([sys.executable, "-m", "nanogpt.sample", f"ckpt={run_dir}"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: checkpoint {run_dir / 'best.pt'}: its shard {folder.name}/__1_0.distcp is missing (1 of 2 "
        "shard files are there); copy the run directory whole, or use another checkpoint of the run"]

    # DCP's table of contents is a pickle: one that would run code is refused before anything runs.
    last = Path(load_checkpoint(run_dir / "last.pt")["shards"])
    marker = tmp_path / "ran"
    (last / ".metadata").write_bytes(pickle.dumps(Exploit(str(marker))))
    with pytest.raises(CheckpointError, match="holds more than checkpoint records, and was refused"):
        with_weights(torch.load(run_dir / "last.pt", weights_only=True), run_dir / "last.pt")
    assert not marker.exists()


class Exploit:
    """Pickles into a call of os.system, as a malicious checkpoint would."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
