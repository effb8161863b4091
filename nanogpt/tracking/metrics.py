"""A run's own files: metrics.jsonl (one JSON record per line) and summary.json (its headline figures).

metrics.jsonl is always written, whatever the logger, and is what every reader of
a run uses (report, sweep tables, the GPU suite): read_metrics() reads it back,
summarise() computes the figures summary.json and the sweep tables hold.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from nanogpt.fileio import is_refused_write, write_atomically, write_failed

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_EVAL_FIELDS = ("kind", "iter", "tokens", "train_loss", "val_loss")  # what every eval record holds


class MetricsLog:
    """Appends one JSON record per call to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.file = open(self.path, "a", encoding="utf-8")
        self.failed = False  # a write was refused (reported once, as WriteFailed)

    def log(self, record: dict) -> None:
        """Write record as one line, flushed so a crash loses nothing already logged.

        A write the file system refuses (a full disk) is WriteFailed, the one-line
        message; a line it cut short is dropped when the run resumes (keep_records_before).
        """
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:
            if not is_refused_write(error):
                raise
            self.failed = True
            raise write_failed(self.path, error, appending=True) from None

    def close(self) -> None:
        """Close the file (after a refused write, dropping what it could not write: that was reported)."""
        with contextlib.suppress(OSError) if self.failed else contextlib.nullcontext():
            self.file.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Resumed:
    """Where a resumed run's checkpoint left off: next step to take, and the last evaluation done."""

    iter_num: int
    last_eval_iter: int | None

    def already_made(self, record: dict) -> bool:
        """True for a record the checkpointed run had made; the resumed run will make the others again."""
        if record.get("kind") == "eval":
            return self.last_eval_iter is not None and record["iter"] <= self.last_eval_iter
        return record.get("iter", 0) < self.iter_num


def keep_records_before(run_dir: Path, resumed: Resumed) -> list[dict]:
    """Rewrite metrics.jsonl (atomically) with only the records made before the checkpoint; return them.

    A process killed mid-write may leave a torn last line; it is dropped too.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if resumed.already_made(record):
            kept.append(record)
    write_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept),
                                                      encoding="utf-8"))
    return kept


def lower_is_better(best_by: str) -> bool:
    """Which way a held-out figure that picks best.pt improves: a loss down, any other (a score) up."""
    return best_by.endswith("loss")


def summarise(records: list[dict], wall_time_s: float | None = None, best_by: str = "val_loss") -> dict:
    """The figures summary.json and the sweep tables hold, from a run's metrics records.

    The median tokens/s ignores the slow first steps (compilation, warm-up).
    best_by is the eval figure best.pt is chosen by (the objective's: the val loss,
    or a score such as preference accuracy or mean reward), which the summary names
    when it is not the val loss. eval_tasks: the figures beyond the losses at the best
    evaluation (the model best.pt holds), if any.
    """
    evals = [r for r in records if r.get("kind") == "eval" and best_by in r]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    pick = min if lower_is_better(best_by) else max  # the first of equals, as training keeps it
    best = pick(evals, key=lambda r: r[best_by], default=None)
    summary = {
        "best_val_loss": best.get("val_loss") if best else None,
        "best_iter": best["iter"] if best else None,
        "iters": records[-1].get("iter") if records else None,
        "tokens": max((r.get("tokens", 0) for r in records), default=0),
        "wall_time_s": wall_time_s,
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
    }
    if best_by != "val_loss":
        summary.update(best_by=best_by, best_value=best[best_by] if best else None)
    if best and task_figures(best):
        summary["eval_tasks"] = task_figures(best)
    return summary


def task_figures(record: dict) -> dict[str, float]:
    """The eval_tasks' figures of an eval record (hellaswag_acc_norm, bpb, ...): fields beyond the losses."""
    return {key: value for key, value in record.items() if key not in LOSS_EVAL_FIELDS
            and isinstance(value, (int, float)) and not isinstance(value, bool)}


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json, or the same figures computed from metrics.jsonl (a running or older run).

    A running run is summarised by its val loss, or where it has none (objective=grpo)
    by the first score its evaluations hold.
    """
    path = Path(run_dir) / SUMMARY_FILE
    if path.is_file():
        return json.loads(path.read_text())
    records = read_metrics(run_dir)
    first = next((r for r in records if r.get("kind") == "eval"), {})
    scores = task_figures(first)
    best_by = "val_loss" if "val_loss" in first or not scores else next(iter(scores))
    return summarise(records, best_by=best_by)
