"""The GPU suite's CPU-side logic: it runs every measurement, survives a failing one, and reports the targets.

Speeds are not asserted (a benchmark, not a test); the report's structure and the parsing are.
The suite command runs its main() in the test process (tests/commands.py); each of its runs is a real
process of its own, as on the GPU.
"""

import json
import math

import pytest

from nanogpt.bench import suite_commands
from nanogpt.benchmarks.suite import check_targets, largest_relative_difference, nanogpt_figures

from .commands import run_in_process

TINY = ["device=cpu", "device.compile=false", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "model.block_size=16", "batch_size=2", "max_iters=4", "eval_interval=2", "eval_iters=2",
        "bench.warmup_steps=1", "bench.train_steps=2", "bench.gen_tokens=5"]


def fake_nanogpt(root):
    """A stand-in for a nanoGPT checkout: prepare.py needs input.txt, train.py prints eval lines."""
    data = root / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    (root / "config").mkdir()
    (data / "prepare.py").write_text("import pathlib\nassert pathlib.Path('input.txt').is_file()\n"
                                     "pathlib.Path('train.bin').write_bytes(b'')\n")
    (root / "train.py").write_text("import sys\nprint(sys.argv)\n"
                                   "print('step 0: train loss 4.2000, val loss 4.1900')\n"
                                   "print('step 4: train loss 3.1000, val loss 3.2000')\n")
    return root


@pytest.mark.slow  # every run of the GPU suite, the step compiled by inductor among them
def test_suite_on_the_cpu_reports_every_run_and_target(tmp_path, corpus, data_root):
    out = tmp_path / "suite"
    # The gpt2 run asks for dataset=shakespeare (GPT-2 BPE); the suite's dataset=text wins over it.
    result = run_in_process("nanogpt.bench", "suite=gpu", *TINY, "dataset=text", f"dataset.source={corpus}",
                            f"data_root={data_root}", f"bench.nanogpt_dir={fake_nanogpt(tmp_path / 'ng')}",
                            "bench.nanogpt_args=['--device=cpu']", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "suite.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"default", "default_graphs", "gpt2", "recipe", "nanogpt"}
    for name in ("default", "gpt2"):
        assert runs[name]["iters_per_sec"] > 0 and runs[name]["ms_per_token"] > 0
        assert runs[name]["mfu"] is None  # no known peak on a CPU
    assert runs["gpt2"]["settings"]["dtype"] == "bfloat16" and runs["gpt2"]["settings"]["model"] == "1/2/32"
    assert runs["recipe"]["iter"] == 4 and math.isfinite(runs["recipe"]["val_loss"])
    assert runs["nanogpt"]["val_loss"] == 3.2 and runs["nanogpt"]["iter"] == 4
    assert "--device=cpu" in (out / "nanogpt.log").read_text()
    assert (tmp_path / "ng" / "data" / "shakespeare_char" / "input.txt").read_text() == corpus.read_text()
    assert runs["recipe"]["wall_ratio_to_nanogpt"] > 0
    targets = {row["target"]: row for row in report["targets"]}
    assert targets["GPT-2 124M MFU >= 50% (H100 goal)"]["met"] is None  # unmeasured, not failed
    assert targets["default config fits in 8 GB"]["met"] is True
    assert runs["default"]["rows_time_vs_one"] > 0  # 16 rows decoded together, timed against one
    # The compiled step beside eager: timed, and its greedy tokens checked against eager's.
    assert runs["default"]["compiled_ms_per_token"] > 0 and runs["default"]["compiled_same_greedy"] is True
    assert targets["the compiled step's greedy tokens are eager's (200 tokens)"]["met"] is True
    assert 0 <= runs["default_graphs"]["losses_vs_default"] < 0.02  # no graphs on a CPU: the same steps
    assert "| target | measured | met |" in result.stdout
    assert (out / "suite.md").read_text().strip() in result.stdout
    # The suite and each of its runs let go of their directories: no lock or holder file left anywhere.
    assert not list(out.rglob(".run.*")), sorted(out.rglob(".run.*"))


@pytest.mark.slow  # the default run, its generation compiled by inductor
def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path, corpus, data_root):
    out = tmp_path / "suite"
    result = run_in_process("nanogpt.bench", "suite=gpu", *TINY, "dataset=text", f"dataset.source={corpus}",
                            f"data_root={data_root}", f"bench.nanogpt_dir={tmp_path / 'absent'}",
                            "bench.suite_runs=[default,nanogpt]", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = json.loads((out / "suite.json").read_text())["runs"]
    assert set(runs) == {"default", "nanogpt"}  # only the runs asked for (a suite split over commands)
    assert "not a karpathy/nanoGPT checkout" in runs["nanogpt"]["error"]
    assert "iters_per_sec" in runs["default"]
    assert "| nanogpt | failed: " in result.stdout


def test_overrides_reach_the_runs_they_mean_something_to():
    given = ["batch_size=2", "suite=gpu", "bench.nanogpt_dir=/x", "bench.train_steps=2", "+extra=1"]
    commands = suite_commands(given, ["gpt2", "recipe"])
    assert commands["gpt2"][1][:2] == ["model=gpt2", "dataset=shakespeare"]
    assert "batch_size=16" not in commands["gpt2"][1] and "bench.train_steps=50" not in commands["gpt2"][1]
    assert commands["gpt2"][1][-3:] == ["batch_size=2", "bench.train_steps=2", "+extra=1"]
    assert commands["recipe"][1][0] == "+experiment=shakespeare_char"
    assert commands["recipe"][1][-2:] == ["batch_size=2", "+extra=1"]
    assert "suite=gpu" not in commands["recipe"][1]


def test_nanogpt_output_is_parsed_and_targets_are_judged():
    output = ("iter 0: loss 4.2\nstep 0: train loss 4.2, val loss 4.19\n"
              "step 5000: train loss 1.01, val loss 1.47\n")
    assert nanogpt_figures(output) == {"iter": 5000, "val_loss": 1.47, "train_loss": 1.01,
                                       "best_val_loss": 1.47}
    default = {"iters_per_sec": 150.0, "peak_memory_mb": 9000.0, "ms_per_token": 4.0, "rows_time_vs_one": 1.5,
               "compiled_ms_per_token": 1.5, "compiled_same_greedy": False, "losses": [3.0, 2.0]}
    graphs = {"losses": [3.03, 2.0]}
    recipe = {"best_val_loss": 1.4618, "wall_ratio_to_nanogpt": 0.92}
    graphs["losses_vs_default"] = largest_relative_difference(graphs["losses"], default["losses"])
    assert graphs["losses_vs_default"] == pytest.approx(0.01)
    rows = {row["target"]: row["met"] for row in check_targets(
        {"default": default, "default_graphs": graphs, "gpt2": {"error": "x"}, "recipe": recipe})}
    assert rows["default config >= 150 iter/s"] is True and rows["default config fits in 8 GB"] is False
    assert rows["generation <= 2 ms/token (default config, eager: the default)"] is False
    assert rows["generation <= 2 ms/token (default config, compiled step as CUDA graphs)"] is True
    assert rows["the compiled step's greedy tokens are eager's (200 tokens)"] is False  # faster, not the same
    assert rows["training as CUDA graphs: losses within 2% of compiled training's"] is True
    assert rows["16 sequences <= 2x the time of one"] is True
    assert rows["GPT-2 124M MFU >= 50% (H100 goal)"] is None
    assert rows["shakespeare_char best val <= 1.47 in 5000 iters"] is True
    assert rows["shakespeare_char in <= 0.5x nanoGPT's wall time"] is False


def test_unknown_suite_is_refused(tmp_path):
    result = run_in_process("nanogpt.bench", "suite=tpu", cwd=tmp_path)
    assert result.returncode == 2 and "suite=tpu is unknown" in result.stderr
    result = run_in_process("nanogpt.bench", "suite=gpu", "bench.suite_runs=[default,mfu]", cwd=tmp_path)
    assert result.returncode == 2 and "['mfu'] unknown" in result.stderr
