"""The benchmark command runs for real and reports every figure (it asserts no speeds)."""

import json

import pytest

from .conftest import run_module


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_bench_prints_a_table_and_writes_json(tmp_path, corpus, data_root):
    out = tmp_path / "bench"
    result = run_module(
        "nanogpt.bench", "device=cpu", "model=tiny", "model.n_layer=2", "model.n_embd=32",
        "model.n_head=2", "model.block_size=32", "batch_size=4", "dataset=text",
        f"dataset.source={corpus}", f"data_root={data_root}", "bench.warmup_steps=1",
        "bench.train_steps=2", "bench.gen_tokens=40", f"hydra.run.dir={out}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "bench.json").read_text())
    assert results["settings"]["model"] == "2/2/32" and results["settings"]["block_size"] == 32
    assert results["train"]["train_tokens_per_sec"] > 0 and results["train"]["peak_memory_mb"] > 0
    for key in ("generate_cached", "generate_uncached"):
        assert results[key]["tokens_per_sec"] > 0
    assert results["cache_speedup"] > 0
    for row in ("train ms/iter", "train tokens/s", "KV cache speed-up", "peak memory MB"):
        assert row in result.stdout
    assert not list(out.glob("*.pt"))  # a benchmark writes no checkpoint
    assert not list(out.glob(".run.*"))  # and lets go of its directory: no lock or holder file


def test_bench_rejects_unknown_settings(tmp_path):
    result = run_module("nanogpt.bench", "bench.steps=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown key 'bench.steps'" in result.stderr and "train_steps" in result.stderr
