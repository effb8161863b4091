"""Comparing runs: loss curves of a run, and a table and plot of the runs of a sweep or of several paths.

Everything here reads only what runs leave on disk (metrics.jsonl, summary.json),
so it works on finished, running and copied runs alike. Which overrides each run
was given is the command line's business: callers pass overrides_of (the Hydra
edge reads a job's .hydra/overrides.yaml), and the table shows the keys that differ.
A report replaces only files a report wrote: a user's summary.md (or plot)
where a report would go is refused in one line, before anything is written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nanogpt.errors import UserError
from nanogpt.fileio import check_own_files, record_written, removed_unless_filled, write_atomically
from nanogpt.tracking.metrics import METRICS_FILE, lower_is_better, read_metrics, read_summary, task_figures

OverridesOf = Callable[[Path], dict[str, str]]
REPORT_COMMAND = "nanogpt.report"  # who wrote the files of a report (fileio.WRITTEN_FILE), sweeps' included


def no_overrides(run_dir: Path) -> dict[str, str]:
    return {}


SUMMARY_TABLE = "summary.md"
SUMMARY_CSV = "summary.csv"
SWEEP_PLOT = "val_loss.png"
RUN_PLOT = "loss_curve.png"
TASKS_PLOT = "eval_tasks.png"  # benchmarks scored during training (eval_tasks), one panel each


class ReportError(UserError):
    """A path given to the report holds no runs."""


@dataclass
class RunResult:
    """What one run left on disk, read back."""

    path: Path
    overrides: dict[str, str]
    records: list[dict] = field(repr=False)
    summary: dict

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "eval"]

    @property
    def train_steps(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "train"]

    @property
    def task_figures(self) -> dict[str, float]:
        """The eval_tasks' figures at the best evaluation (summary.json's eval_tasks)."""
        return self.summary.get("eval_tasks") or {}

    @property
    def best_val_loss(self) -> float | None:
        """The lowest val loss evaluated, or None if the run never evaluated."""
        return self.summary.get("best_val_loss")


def load_run(run_dir: Path, overrides: dict[str, str] | None = None) -> RunResult:
    """Read a run directory back; overrides are what its command line set (key -> value text)."""
    return RunResult(run_dir, overrides or {}, read_metrics(run_dir), read_summary(run_dir))


def job_sort_key(path: Path) -> tuple:
    """Order job directories by their leading job number (0_, 1_, ... 10_), then by name."""
    number, _, _ = path.name.partition("_")
    return (int(number), path.name) if number.isdigit() else (math.inf, path.name)


def find_run_dirs(path: Path) -> list[Path]:
    """The run directories at path: path itself, or every run below it (a sweep)."""
    if not path.exists():
        raise ReportError(f"{path} does not exist; give a run directory or a sweep directory")
    if (path / METRICS_FILE).is_file():
        return [path]
    runs = sorted((p.parent for p in path.rglob(METRICS_FILE)), key=job_sort_key)
    if not runs:
        raise ReportError(f"{path} holds no runs (no {METRICS_FILE} in it or below it)")
    return runs


def varying_keys(runs: list[RunResult]) -> list[str]:
    """The override keys whose values differ between runs, in first-seen order."""
    keys: list[str] = []
    for run in runs:
        keys += [key for key in run.overrides if key not in keys]
    return [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]


def run_labels(runs: list[RunResult]) -> list[str]:
    """Short unique names: each run's path relative to what all the runs have in common."""
    if len(runs) == 1:
        return [runs[0].path.name]
    common = Path(os.path.commonpath([run.path.resolve() for run in runs]))
    return [str(run.path.resolve().relative_to(common)) for run in runs]


def ranked(runs: list[RunResult]) -> list[RunResult]:
    """Runs best first (lowest val loss, or highest score where best.pt was chosen by one: best_by);
    runs that never evaluated go last.
    """

    def key(run: RunResult) -> tuple[bool, float]:
        best_by = run.summary.get("best_by", "val_loss")
        value = run.summary.get("best_value") if "best_by" in run.summary else run.best_val_loss
        return value is None, (value or 0.0) * (1 if lower_is_better(best_by) else -1)

    return sorted(runs, key=key)


def table_rows(runs: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table, best run first."""
    keys = varying_keys(runs)
    figures = task_names(runs)
    labels = dict(zip(map(id, runs), run_labels(runs), strict=True))
    header = ["rank", "run", *keys, "best val loss", "at iter", *figures, "wall time (s)", "tokens/s"]
    rows = []
    for rank, run in enumerate(ranked(runs), start=1):
        s = run.summary
        rows.append([
            str(rank), labels[id(run)], *(run.overrides.get(key, "") for key in keys),
            format_number(s.get("best_val_loss"), ".4f"), format_number(s.get("best_iter"), "d"),
            *(format_number(run.task_figures.get(name), ".4f") for name in figures),
            format_number(s.get("wall_time_s"), ".1f"), format_number(s.get("tokens_per_sec"), ",.0f"),
        ])
    return header, rows


def task_names(runs: list[RunResult]) -> list[str]:
    """The eval_tasks' figures any of the runs recorded, in first-seen order."""
    names: list[str] = []
    for run in runs:
        for record in run.evals:
            names += [name for name in task_figures(record) if name not in names]
    return names


def format_number(value, spec: str) -> str:
    """The value formatted by spec, or "-" when it is missing."""
    return "-" if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table with aligned columns."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    """The table as CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def new_figure(columns: int = 1):
    """A matplotlib Figure drawn off-screen (no pyplot, no display needed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5 * columns, 4.5), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def save_figure(figure, path: Path) -> None:
    """Write figure as a PNG, atomically."""
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def plot_val_curves(runs: list[RunResult], path: Path) -> None:
    """One val-loss curve per run against iteration, best run first in the legend."""
    figure, (axes,) = new_figure()
    labels = dict(zip(map(id, runs), run_labels(runs), strict=True))
    for run in ranked(runs):
        evals = [r for r in run.evals if "val_loss" in r]  # objective=grpo records no loss
        if evals:
            axes.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], marker="o",
                      markersize=3, label=f"{labels[id(run)]} ({format_number(run.best_val_loss, '.4f')})")
    axes.set(xlabel="iteration", ylabel="val loss", title="validation loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    save_figure(figure, path)


def plot_task_curves(runs: list[RunResult], path: Path) -> bool:
    """One panel per eval_tasks figure against iteration, one curve per run; False if none was recorded."""
    names = task_names(runs)
    if not names:
        return False
    figure, axes = new_figure(columns=len(names))
    labels = dict(zip(map(id, runs), run_labels(runs), strict=True))
    for ax, name in zip(axes, names, strict=True):
        for run in ranked(runs):
            evals = [r for r in run.evals if name in r]
            if evals:
                ax.plot([r["iter"] for r in evals], [r[name] for r in evals], marker="o", markersize=3,
                        label=labels[id(run)])
        ax.set(xlabel="iteration", ylabel=name, title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(figure, path)
    return True


def plot_run(run: RunResult, path: Path) -> None:
    """Train and val loss of one run, against iteration (left) and tokens seen (right)."""
    figure, axes = new_figure(columns=2)
    steps, evals = run.train_steps, [r for r in run.evals if "val_loss" in r]
    for ax, x in zip(axes, ("iter", "tokens"), strict=True):
        ax.plot([r[x] for r in steps], [r["loss"] for r in steps], alpha=0.4, linewidth=1,
                label="train (batch)")
        ax.plot([r[x] for r in evals], [r["train_loss"] for r in evals], marker="o", markersize=3,
                label="train (eval)")
        ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], marker="o", markersize=3,
                label="val")
        ax.set(xlabel="iteration" if x == "iter" else "tokens", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(f"{run.path.name}: best val {format_number(run.best_val_loss, '.4f')}")
    save_figure(figure, path)


def write_comparison(runs: list[RunResult], out_dir: Path) -> tuple[str, list[Path]]:
    """summary.md, summary.csv and val_loss.png for runs in out_dir; returns (table, files).

    Only files of those names that a report wrote are replaced (writing_reports).
    """
    header, rows = table_rows(runs)
    table = markdown_table(header, rows)
    written = [out_dir / SUMMARY_TABLE, out_dir / SUMMARY_CSV, out_dir / SWEEP_PLOT]
    with writing_reports(out_dir, [*written, out_dir / TASKS_PLOT], written):
        write_atomically(written[0], lambda tmp: tmp.write_text(table + "\n"))
        write_atomically(written[1], lambda tmp: tmp.write_text(csv_text(header, rows)))
        plot_val_curves(runs, written[2])
        if plot_task_curves(runs, out_dir / TASKS_PLOT):
            written.append(out_dir / TASKS_PLOT)
    return table, written


@contextlib.contextmanager
def writing_reports(folder: Path, names: list[Path], written: list[Path]) -> Iterator[None]:
    """Write report files into folder: refused first, in one line, if a file of those names is the user's.

    A file a report wrote before (recorded in the folder, unchanged since) is
    replaced; once the block has written them, the files listed in written
    (which it may add to) are recorded as the report's.
    """
    check_own_files(folder, [path.name for path in names], REPORT_COMMAND,
                    "give the report another folder (--out DIR), or move that file")
    with removed_unless_filled(folder):
        yield
    record_written(folder, written, REPORT_COMMAND)


def report_sweep(sweep_dir: Path, overrides_of: OverridesOf = no_overrides) -> tuple[str, list[Path]]:
    """Compare every run of a sweep directory, writing the table and plot into it."""
    runs = [load_run(path, overrides_of(path)) for path in find_run_dirs(sweep_dir)]
    return write_comparison(runs, sweep_dir)


def report_run(run_dir: Path, out_dir: Path | None = None) -> tuple[str, list[Path]]:
    """The loss-curve plot of one run (in the run directory unless out_dir is given)."""
    run = load_run(run_dir)
    path = (out_dir or run_dir) / RUN_PLOT
    written = [path]
    with writing_reports(path.parent, [path, path.parent / TASKS_PLOT], written):
        plot_run(run, path)
        if plot_task_curves([run], path.parent / TASKS_PLOT):
            written.append(path.parent / TASKS_PLOT)
    s = run.summary
    line = (f"{run_dir}: best val loss {format_number(s.get('best_val_loss'), '.4f')} "
            f"at iter {format_number(s.get('best_iter'), 'd')}"
            + "".join(f", {name} {value:.4f}" for name, value in run.task_figures.items()))
    return line, written


def report(paths: list[Path], out_dir: Path | None = None,
           overrides_of: OverridesOf = no_overrides) -> tuple[str, list[Path]]:
    """Report on one run, one sweep, or a comparison of several paths; returns (text, files)."""
    found = [find_run_dirs(path) for path in paths]
    if len(paths) == 1 and found[0] == [paths[0]]:
        return report_run(paths[0], out_dir)
    if len(paths) == 1 and out_dir is None:
        return report_sweep(paths[0], overrides_of)
    runs = [load_run(run_dir, overrides_of(run_dir)) for run_dirs in found for run_dir in run_dirs]
    out_dir = out_dir or Path("outputs") / "reports" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return write_comparison(runs, out_dir)
