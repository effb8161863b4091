"""Train and sample through real ``python -m`` processes, as a user would.

The run is conftest's trained_run: tiny, on a small corpus, in Hydra's default outputs/ layout.
"""

import json

import pytest

from nanogpt.tracking.metrics import read_metrics
from nanogpt.weights.checkpoint import load_checkpoint

from .commands import run_in_process
from .conftest import TINY_RUN, run_module


def test_run_directory_holds_everything(trained_run):
    _, run_dir, _ = trained_run
    for name in ("config.yaml", "train.log", "metrics.jsonl", "best.pt", "last.pt", ".hydra/config.yaml"):
        assert (run_dir / name).exists(), name
    assert "n_embd: 32" in (run_dir / "config.yaml").read_text()
    assert "eval 80" in (run_dir / "train.log").read_text()


def test_loss_falls(trained_run):
    _, run_dir, _ = trained_run
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 20, 40, 60, 80]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    train_records = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert all(r["tokens_per_sec"] > 0 and r["lr"] > 0 for r in train_records)


def test_checkpoint_carries_what_sampling_needs(trained_run):
    _, run_dir, _ = trained_run
    state = load_checkpoint(run_dir / "last.pt")
    assert state["iter_num"] == 80
    assert state["model_config"]["n_embd"] == 32
    assert state["tokenizer"]["kind"] == "char" and "R" in state["tokenizer"]["vocabulary"]
    assert state["config"]["model"]["n_layer"] == 2 and "optimizer" in state
    best = load_checkpoint(run_dir / "best.pt")
    assert best["best_val_loss"] <= state["best_val_loss"] + 1e-9


def test_end_of_run_sample_is_printed(trained_run):
    _, _, result = trained_run
    assert "sample:" in result.stdout


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_sample_from_run_dir_streams_text(trained_run):
    work, run_dir, _ = trained_run
    result = run_module("nanogpt.sample", f"ckpt={run_dir}", "prompt=ROMEO:", "num_tokens=60",
                        "num_samples=2", cwd=work)
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------")
    assert len(samples) == 2
    vocabulary = set(load_checkpoint(run_dir / "best.pt")["tokenizer"]["vocabulary"])
    for sample in samples:
        text = sample.strip("\n")
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 60
        assert set(text) <= vocabulary


def test_sample_without_ckpt_uses_the_newest_run(trained_run):
    work, run_dir, _ = trained_run
    result = run_in_process("nanogpt.sample", "num_tokens=10", cwd=work)
    assert result.returncode == 0, result.stderr
    assert str((run_dir / "best.pt").relative_to(work)) in result.stderr


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_sample_is_reproducible_and_reads_prompt_files(trained_run, tmp_path):
    work, run_dir, _ = trained_run
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:")
    # One real process and one in this process: the seed, not the process, fixes the text.
    runs = [run("nanogpt.sample", f"ckpt={run_dir / 'best.pt'}", f"prompt_file={prompt}",
                "num_tokens=40", "seed=5", cwd=work) for run in (run_module, run_in_process)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("JULIET:")
    cached = run_in_process("nanogpt.sample", f"ckpt={run_dir}", f"prompt_file={prompt}",
                            "num_tokens=40", "seed=5", "use_cache=false", cwd=work)
    assert cached.stdout == runs[0].stdout


@pytest.mark.parametrize("args,expected", [
    (["ckpt=/no/such/run"], "ckpt=/no/such/run does not exist"),
    (['prompt="ROMEO§"'], "'§'"),
    (["prompt_file=/no/such/prompt.txt"], "prompt_file=/no/such/prompt.txt does not exist"),
    (["temperature=-1"], "temperature=-1.0 must be a number >= 0"),
    (["device=cuda"], "device=cuda"),
])
def test_bad_sample_input_fails_with_one_clear_line(trained_run, args, expected):
    import torch

    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    work, run_dir, _ = trained_run
    ckpt = [] if args[0].startswith("ckpt") else [f"ckpt={run_dir}"]
    run = run_module if args == ["ckpt=/no/such/run"] else run_in_process  # one real process
    result = run("nanogpt.sample", *ckpt, *args, cwd=work)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_data_entry_prepares_only(tmp_path, corpus, data_root):
    result = run_module("nanogpt.data", "dataset=text", f"dataset.source={corpus}",
                        "dataset.name=toy", f"data_root={data_root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((data_root / "toy" / "meta.json").read_text())
    assert meta["train_tokens"] > 0 and "toy" in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_shakespeare_default_dataset_from_local_source(tmp_path, shakespeare, data_root):
    result = run_in_process("nanogpt.data", f"data_root={data_root}", cwd=tmp_path,
                            env={"NANOGPT_SHAKESPEARE_SOURCE": str(shakespeare)})
    assert result.returncode == 0, result.stderr
    meta = json.loads((data_root / "shakespeare_char" / "meta.json").read_text())
    assert meta["vocab_size"] == 65
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_variants_and_muon_train_resume_and_sample(tmp_path, corpus, data_root):
    """Every architecture variant plus Muon through train, resume and sample."""
    variants = ["model.position_encoding=rope", "model.norm=rmsnorm", "model.qk_norm=true",
                "model.activation=relu2", "optimizer=muon", "optimizer.lr=3e-3", "optimizer.warmup_iters=5"]
    common = [*TINY_RUN, *variants, "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}",
              "eval_interval=15"]
    first = run_in_process("nanogpt.train", *common, "max_iters=30", "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_in_process("nanogpt.train", *common, "max_iters=45", "resume=run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["iter_num"] == 45
    model_config = state["model_config"]
    assert model_config["position_encoding"] == "rope" and model_config["activation"] == "relu2"
    evals = [r for r in read_metrics(tmp_path / "run") if r.get("kind") == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    sampled = run_in_process("nanogpt.sample", "ckpt=run", "num_tokens=80", "seed=3", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert len(sampled.stdout) >= 80


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_eval_at_start_false_skips_only_the_untrained_evaluation(tmp_path, corpus, data_root):
    common = [*TINY_RUN, "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}",
              "max_iters=25", "eval_interval=10"]
    for name, extra in (("default", []), ("speedrun", ["eval_at_start=false"])):
        result = run_in_process("nanogpt.train", *common, *extra, f"hydra.run.dir={name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    iters = {name: [r["iter"] for r in read_metrics(tmp_path / name) if r.get("kind") == "eval"]
             for name in ("default", "speedrun")}
    assert iters == {"default": [0, 10, 20, 25], "speedrun": [10, 20, 25]}
