"""eval_tasks: benchmarks scored at every evaluation of a training run, recorded like the losses."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from nanogpt.tracking.compare import report
from nanogpt.tracking.metrics import read_metrics
from nanogpt.weights.checkpoint import load_checkpoint

from .commands import run_in_process
from .conftest import TINY_RUN
from .hellaswag_examples import HAND_WRITTEN, write_jsonl
from .test_eval import last_json
from .test_eval_tasks import one_line_error
from .test_stops import Running, no_traceback

FIGURES = ("bpb", "hellaswag_acc", "hellaswag_acc_norm")


@pytest.fixture
def bpe_run(tmp_path, corpus, data_root) -> list[str]:
    """Train arguments: a byte-level BPE of the corpus (any text encodes), room for HellaSwag's endings."""
    write_jsonl(tmp_path / "hellaswag.jsonl", HAND_WRITTEN)
    return [*TINY_RUN, "model.block_size=128", "dataset=text", f"dataset.source={corpus}",
            "dataset.name=toy_bpe", "dataset.tokenizer=bpe", "dataset.vocab_size=300",
            f"data_root={data_root}", "eval_tasks=[bpb,hellaswag]",
            f"tasks.hellaswag.source={tmp_path / 'hellaswag.jsonl'}"]


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_eval_tasks_are_recorded_like_the_losses(tmp_path, bpe_run):
    run_dir = tmp_path / "run"
    result = run_in_process("nanogpt.train", *bpe_run, "max_iters=4", "eval_interval=2", "logger=tensorboard",
                            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 2, 4] and all(set(FIGURES) <= r.keys() for r in evals)
    assert "hellaswag_acc_norm" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    best = next(r for r in evals if r["iter"] == summary["best_iter"])
    assert summary["eval_tasks"] == {name: best[name] for name in FIGURES}

    # The figures are what nanogpt.eval measures on the checkpoint of that evaluation (best.pt).
    scored = run_in_process("nanogpt.eval", f"ckpt={run_dir}", "task=bpb", "device=cpu", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert last_json(scored.stdout)["bits_per_byte"] == pytest.approx(best["bpb"], abs=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {f"eval/{name}" for name in FIGURES} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/hellaswag_acc_norm")] == [0, 2, 4]

    text, written = report([run_dir])
    assert run_dir / "eval_tasks.png" in written and "hellaswag_acc_norm" in text


def test_sweep_tables_show_the_eval_tasks(tmp_path):
    for name, acc_norm in (("0_lr=1", 0.31), ("1_lr=2", 0.27)):
        run = tmp_path / "sweep" / name
        run.mkdir(parents=True)
        records = [{"kind": "eval", "iter": i, "tokens": i, "train_loss": 3.0 - i, "val_loss": 3.1 - i,
                    "hellaswag_acc_norm": acc_norm + i / 100} for i in (0, 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table, written = report([tmp_path / "sweep"])
    header, _, first, second = table.splitlines()
    assert "| best val loss | at iter | hellaswag_acc_norm |" in header
    assert "| 0.3200 " in first and "| 0.2800 " in second  # each run's figure at its best evaluation
    assert tmp_path / "sweep" / "eval_tasks.png" in written


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_stop_during_the_eval_tasks_is_a_stop_during_evaluation(tmp_path, bpe_run):
    run_dir = tmp_path / "run"
    # The real training command, with a SIGTERM sent from inside HellaSwag's scoring.
    code = ("import os, signal, sys\n"
            "from nanogpt.evaluation import hellaswag\n"
            "scored = hellaswag.score_requests\n"
            "def score_requests(*args, **kwargs):\n"
            "    print('scoring hellaswag', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return scored(*args, **kwargs)\n"
            "hellaswag.score_requests = score_requests\n"
            "from nanogpt import train\n"
            f"sys.argv = ['nanogpt.train', *{[*bpe_run, 'max_iters=10', f'hydra.run.dir={run_dir}']!r}]\n"
            "train.main()\n")
    run = Running([sys.executable, "-c", code], tmp_path)
    run.wait_for("scoring hellaswag")
    run.process.wait(timeout=120)
    for reader in run.readers:
        reader.join(timeout=5)
    assert run.process.returncode == 128 + signal.SIGTERM
    no_traceback(run)
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["iter_num"] == 0 and saved["training"]["last_eval_iter"] is None  # resume evaluates again
    assert run.stdout[-1].startswith("stopped by SIGTERM before iteration 0: saved ")
    assert not [r for r in read_metrics(run_dir) if r["kind"] == "eval"]  # nothing half-measured recorded


def test_eval_tasks_are_checked_before_training(tmp_path, corpus, data_root):
    unknown = run_in_process("nanogpt.train", *TINY_RUN, "eval_tasks=[bpb,mmlu]", cwd=tmp_path)
    assert one_line_error(unknown) == "error: eval_tasks: mmlu is not one of bpb, hellaswag, lm_eval"
    run_dir = tmp_path / "run"
    missing = run_in_process("nanogpt.train", *TINY_RUN, "dataset=text", f"dataset.source={corpus}",
                             f"data_root={data_root}", "logger=none", "eval_tasks=[hellaswag]",
                             "tasks.hellaswag.source=nowhere.jsonl", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert one_line_error(missing).startswith("error: tasks.hellaswag.source=nowhere.jsonl does not exist; ")
    assert not (run_dir / "last.pt").exists() and not (run_dir / "metrics.jsonl").exists()  # no step taken

