"""The GPU suite: ``python -m nanogpt.bench suite=gpu [bench.nanogpt_dir=PATH] [overrides]``.

One command that measures, on whatever GPU it finds, what the project promises
for GPUs, and writes one report (suite.json, suite.md):

- default: the default config (6/6/384, block 256, batch 64) through nanogpt.bench:
  iterations per second, peak GPU memory, ms per generated token at batch 1 with
  each token streamed to the host (eager, the default, and through the compiled
  one-token step as CUDA graphs, whose greedy tokens must be eager's), and 16
  sequences decoded together against one;
- default_graphs: the same with the training step as CUDA graphs: whether it pays,
  and whether its losses over the timed steps stay within 2% of default's;
- gpt2: GPT-2 124M (model=gpt2 on GPT-2 BPE) training in bf16 with torch.compile
  and scaled_dot_product_attention (flash attention where the GPU has it):
  tokens/s and MFU against the GPU's dense bf16 peak, and ms per generated token;
- recipe: ``python -m nanogpt.train +experiment=shakespeare_char`` (best val loss
  over 5000 iterations, wall time) and, if bench.nanogpt_dir names a karpathy/nanoGPT
  checkout, nanoGPT's own ``train.py config/train_shakespeare_char.py`` beside it.

Each measurement is its own process, so one run's compiled graphs and GPU
memory never colour another's figures, and a run that fails is reported as
failed while the others still run. Overrides given to the suite reach every run
(after the run's own, so they win; nanogpt/bench.py lays them over): that is how
the tests run the whole suite on a CPU with a tiny model. Like the benchmark, it
asserts nothing about speed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nanogpt.tracking.metrics import read_metrics

# The project's GPU targets: (what, the figure's key in a run's results, comparison, bound).
GPU_TARGETS = (
    ("default config >= 150 iter/s", ("default", "iters_per_sec"), ">=", 150.0),
    ("default config fits in 8 GB", ("default", "peak_memory_mb"), "<", 8192.0),
    ("generation <= 2 ms/token (default config, eager: the default)", ("default", "ms_per_token"), "<=", 2.0),
    ("generation <= 2 ms/token (default config, compiled step as CUDA graphs)",
     ("default", "compiled_ms_per_token"), "<=", 2.0),
    ("the compiled step's greedy tokens are eager's (200 tokens)", ("default", "compiled_same_greedy"),
     "==", True),
    ("16 sequences <= 2x the time of one", ("default", "rows_time_vs_one"), "<=", 2.0),
    ("GPT-2 124M generation <= 5 ms/token (eager)", ("gpt2", "ms_per_token"), "<=", 5.0),
    ("GPT-2 124M generation <= 5 ms/token (compiled step as CUDA graphs)", ("gpt2", "compiled_ms_per_token"),
     "<=", 5.0),
    ("GPT-2 124M MFU >= 50% (H100 goal)", ("gpt2", "mfu"), ">=", 0.5),
    ("training as CUDA graphs: losses within 2% of compiled training's",
     ("default_graphs", "losses_vs_default"), "<=", 0.02),
    ("shakespeare_char best val <= 1.47 in 5000 iters", ("recipe", "best_val_loss"), "<=", 1.47),
    ("shakespeare_char in <= 0.5x nanoGPT's wall time", ("recipe", "wall_ratio_to_nanogpt"), "<=", 0.5),
)

# What each of our runs is, before the suite's own overrides are laid over it.
RUNS = {
    # Generation eager (the default) and through the compiled step as CUDA graphs (the candidate),
    # whose greedy tokens are checked against eager's.
    "default": ("nanogpt.bench", ["bench.gen_tokens=1000", "bench.gen_uncached=false",
                                  "bench.gen_rows=16", "bench.gen_compiled=true"]),
    # The default config with its training step replayed as CUDA graphs, which is not yet the
    # default (no GPU has measured it): beside "default", whether it pays, and whether its losses
    # over the timed steps are the compiled step's.
    "default_graphs": ("nanogpt.bench", ["bench.gen_tokens=200", "bench.gen_uncached=false",
                                         "device.cuda_graphs=true"]),
    "gpt2": ("nanogpt.bench", ["model=gpt2", "dataset=shakespeare", "batch_size=16",
                               "device.dtype=bfloat16", "device.compile=true",
                               "bench.warmup_steps=10", "bench.train_steps=50",
                               "bench.gen_tokens=200", "bench.gen_uncached=false",
                               "bench.gen_compiled=true"]),
    "recipe": ("nanogpt.train", ["+experiment=shakespeare_char", "logger=none", "sample_tokens=0",
                                 "save_checkpoints=false"]),
}
SUITE_RUNS = (*RUNS, "nanogpt")
# Keys only the suite itself reads; never passed on.
SUITE_KEYS = ("suite", "bench.nanogpt_dir", "bench.nanogpt_args", "bench.suite_runs", "hydra.")


def run_logged(command: list[str], log_file: Path, cwd: Path | None = None) -> tuple[int, float]:
    """Run command with its output in log_file; return its exit status and wall seconds."""
    start = time.perf_counter()
    with open(log_file, "w") as log:
        status = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    return status, time.perf_counter() - start


def failure(status: int, log_file: Path) -> dict:
    """A failed run's entry: its status and its last line of output."""
    lines = log_file.read_text(errors="replace").strip().splitlines()
    return {"error": f"exit status {status}: {lines[-1] if lines else 'no output'}", "log": str(log_file)}


def bench_figures(results: dict) -> dict:
    """The figures the suite reports from one bench.json."""
    train, generation = results["train"], results["generate_cached"]
    compiled = results.get("generate_compiled", {})
    return {"device": results["machine"]["device"], "settings": results["settings"],
            "ms_per_iter": train["train_ms_per_iter"], "iters_per_sec": 1000 / train["train_ms_per_iter"],
            "tokens_per_sec": train["train_tokens_per_sec"], "mfu": train["mfu"],
            "peak_memory_mb": train["peak_memory_mb"], "losses": train.get("losses"),
            "ms_per_token": generation["ms_per_token"],
            "compiled_ms_per_token": compiled.get("ms_per_token"),
            "compiled_same_greedy": compiled.get("greedy", {}).get("same"),
            "compiled_fell_back": compiled.get("greedy", {}).get("fell_back"),
            "rows_time_vs_one": results.get("generate_rows", {}).get("time_vs_one")}


def largest_relative_difference(ours: list[float], reference: list[float]) -> float | None:
    """The largest |a - b| / |b| over two runs' step losses: how far one way of computing strays."""
    if not ours or not reference or len(ours) != len(reference):
        return None
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, reference, strict=True))


def recipe_figures(run_dir: Path) -> dict:
    """The last evaluation of a training run (its metrics.jsonl): iteration and losses."""
    evals = [record for record in read_metrics(run_dir) if record.get("kind") == "eval"]
    last = evals[-1]
    return {"iter": last["iter"], "val_loss": last["val_loss"], "train_loss": last["train_loss"],
            "best_val_loss": min(record["val_loss"] for record in evals)}


NANOGPT_EVAL = re.compile(r"step (\d+): train loss ([\d.]+|nan), val loss ([\d.]+|nan)")


def nanogpt_figures(output: str) -> dict:
    """The last evaluation nanoGPT's train.py printed ('step N: train loss X, val loss Y')."""
    evals = NANOGPT_EVAL.findall(output)
    if not evals:
        raise ValueError("nanoGPT printed no 'step N: train loss X, val loss Y' line")
    step, train_loss, val_loss = evals[-1]
    return {"iter": int(step), "val_loss": float(val_loss), "train_loss": float(train_loss),
            "best_val_loss": min(float(v) for _, _, v in evals)}


def run_ours(name: str, module: str, overrides: list[str], out_dir: Path) -> dict:
    """Run ``python -m module overrides`` in its own process and collect its figures (or why it failed)."""
    run_dir = out_dir / name
    command = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
    status, seconds = run_logged(command, out_dir / f"{name}.log")
    if status != 0:
        return failure(status, out_dir / f"{name}.log")
    if module == "nanogpt.bench":
        figures = bench_figures(json.loads((run_dir / "bench.json").read_text()))
    else:
        figures = recipe_figures(run_dir)
    return {**figures, "wall_s": seconds, "command": " ".join(command[1:])}


def run_nanogpt(checkout: Path, extra_args: list[str], dataset_source: str | None, out_dir: Path) -> dict:
    """Run karpathy/nanoGPT's own shakespeare_char GPU recipe from its checkout, timed as a whole command.

    Its prepare.py downloads the text unless data/shakespeare_char/input.txt is
    there, so a local dataset_source is copied in first (the machine may be offline).
    """
    data = checkout / "data" / "shakespeare_char"
    log_file = out_dir / "nanogpt.log"
    if not (checkout / "train.py").is_file() or not (data / "prepare.py").is_file():
        return {"error": f"{checkout} is not a karpathy/nanoGPT checkout (no train.py or "
                         "data/shakespeare_char/prepare.py)", "log": str(log_file)}
    if not (data / "train.bin").is_file():
        if dataset_source and Path(dataset_source).is_file() and not (data / "input.txt").is_file():
            shutil.copyfile(dataset_source, data / "input.txt")
        status, _ = run_logged([sys.executable, "prepare.py"], out_dir / "nanogpt_prepare.log", cwd=data)
        if status != 0:
            return failure(status, out_dir / "nanogpt_prepare.log")
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py",
               f"--out_dir={out_dir / 'nanogpt_out'}", *extra_args]
    status, seconds = run_logged(command, log_file, cwd=checkout)
    if status != 0:
        return failure(status, log_file)
    try:
        figures = nanogpt_figures(log_file.read_text(errors="replace"))
    except ValueError as error:
        return {"error": str(error), "log": str(log_file)}
    return {**figures, "wall_s": seconds, "command": " ".join(command[1:])}


def check_targets(runs: dict) -> list[dict]:
    """Each target with the measured figure and whether it is met (None where not measured)."""
    compare = {">": float.__gt__, "<": float.__lt__, ">=": float.__ge__, "<=": float.__le__,
               "==": lambda a, b: a == b}
    rows = []
    for what, (run, key), op, bound in GPU_TARGETS:
        value = runs.get(run, {}).get(key)
        met = None if value is None else compare[op](value if op == "==" else float(value), bound)
        rows.append({"target": what, "measured": value, "met": met})
    return rows


def format_report(report: dict) -> str:
    """The report as Markdown: the runs, then the targets."""
    runs = report["runs"]
    lines = [f"GPU suite, {report['date']}, {report.get('device', 'device unknown')}", "",
             "| run | figures | wall s |", "| --- | --- | --- |"]
    for name, run in runs.items():
        if "error" in run:
            lines.append(f"| {name} | failed: {run['error']} (log: {run['log']}) | |")
            continue
        if "iters_per_sec" in run:
            s, mfu = run["settings"], "n/a" if run["mfu"] is None else f"{run['mfu']:.1%}"
            figures = (f"{s['model']}, block {s['block_size']} x batch {s['batch_size']}, {s['dtype']}, "
                       f"compile {s['compile']}: {run['iters_per_sec']:.1f} iter/s, "
                       f"{run['tokens_per_sec']:,.0f} tok/s, MFU {mfu}, {run['peak_memory_mb']:,.0f} MB, "
                       f"{run['ms_per_token']:.2f} ms/token")
            if run.get("compiled_ms_per_token") is not None:
                same = "the same greedy tokens" if run["compiled_same_greedy"] else "**other greedy tokens**"
                figures += f"; compiled step {run['compiled_ms_per_token']:.2f} ms/token ({same})"
                if run.get("compiled_fell_back"):
                    figures += f", fell back to eager: {run['compiled_fell_back']}"
            if run.get("rows_time_vs_one") is not None:
                figures += f"; 16 rows {run['rows_time_vs_one']:.2f}x one row's time"
            if run.get("losses_vs_default") is not None:
                figures += f"; losses within {run['losses_vs_default']:.2%} of default's"
        else:
            figures = f"val {run['val_loss']:.4f} at iter {run['iter']} (best {run['best_val_loss']:.4f})"
            if "wall_ratio_to_nanogpt" in run:
                figures += f"; wall time {run['wall_ratio_to_nanogpt']:.2f}x nanoGPT's"
        lines.append(f"| {name} | {figures} | {run['wall_s']:.1f} |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for row in report["targets"]:
        value = row["measured"]
        shown = "not measured" if value is None else str(value) if isinstance(value, bool) else f"{value:.4g}"
        met = {None: "—", True: "yes", False: "**no**"}[row["met"]]
        lines.append(f"| {row['target']} | {shown} | {met} |")
    return "\n".join(lines)


def run_suite(commands: dict[str, tuple[str, list[str]]], out_dir: Path, names: list[str] = SUITE_RUNS,
              nanogpt_dir: str | None = None, nanogpt_args: list[str] | None = None,
              dataset_source: str | None = None) -> dict:
    """Run our commands ({name: (module, overrides)}) and, if named, nanoGPT's; write suite.json and suite.md.

    A subset (names) lets the suite be split over several commands where each
    may run only so long (the lent GPU machine allows 10 minutes a command).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {name: run_ours(name, module, overrides, out_dir)
            for name, (module, overrides) in commands.items()}
    if nanogpt_dir and "nanogpt" in names:
        runs["nanogpt"] = run_nanogpt(Path(nanogpt_dir).expanduser().resolve(), list(nanogpt_args or []),
                                      dataset_source, out_dir)
        if "wall_s" in runs["nanogpt"] and "wall_s" in runs.get("recipe", {}):
            runs["recipe"]["wall_ratio_to_nanogpt"] = runs["recipe"]["wall_s"] / runs["nanogpt"]["wall_s"]
    if "losses" in runs.get("default_graphs", {}) and "losses" in runs.get("default", {}):
        runs["default_graphs"]["losses_vs_default"] = largest_relative_difference(
            runs["default_graphs"]["losses"], runs["default"]["losses"])
    device = next((run["device"] for run in runs.values() if "device" in run), None)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
              "runs": runs, "targets": check_targets(runs)}
    (out_dir / "suite.json").write_text(json.dumps(report, indent=2))
    (out_dir / "suite.md").write_text(format_report(report) + "\n")
    return report
