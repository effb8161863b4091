"""Everything a training run records: the log line, progress bar, metrics.jsonl, summary.json and logger.

Only the process that owns the run records anything (rank 0 under torchrun);
the others get a RunRecords that drops what it is given. A resumed run records
each (kind, iteration) once: the records a crashed or stopped process made after
its last checkpoint are dropped from metrics.jsonl (and TensorBoard's), because
the resumed run makes them again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from nanogpt.fileio import write_atomically
from nanogpt.runtime.distributed import context_from_environment
from nanogpt.tracking.forecast import RunForecast, RunPlan
from nanogpt.tracking.loggers import LoggerConfig, start_logger
from nanogpt.tracking.metrics import (
    SUMMARY_FILE,
    MetricsLog,
    Resumed,
    keep_records_before,
    summarise,
    task_figures,
)
from nanogpt.tracking.progress import TrainingProgress

log = logging.getLogger("nanogpt.tracking")


TRAIN_FIELDS = ("kind", "iter", "tokens", "loss", "lr", "ms_per_iter", "tokens_per_sec", "mfu", "grad_norm")


def describe_record(record: dict) -> str:
    """The log line of a train or eval record (with the objective's own figures, e.g. a mean reward)."""
    if record["kind"] == "eval":
        losses = [f"{name.replace('_', ' ')} {record[name]:.4f}" for name in ("train_loss", "val_loss")
                  if name in record]
        figures = [f"{key} {value:.4f}" for key, value in task_figures(record).items()]
        return f"eval {record['iter']}: " + ", ".join(losses + figures)
    line = (f"iter {record['iter']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
            f"{record['ms_per_iter']:.1f} ms/iter, {record['tokens_per_sec']:,.0f} tok/s")
    line += f", mfu {record['mfu']:.1%}" if "mfu" in record else ""
    return line + "".join(f", {key} {value:.4f}" for key, value in record.items() if key not in TRAIN_FIELDS)


class RunRecords:
    """Everything a training run records: the log line, progress bar, metrics.jsonl, summary and logger.

    log() takes the train and eval records the trainer makes; an eval record that
    improves the best (by best_by: the val loss, or the objective's own measure) also
    updates the logger's summary, so a run that dies early still shows its best.
    close() writes summary.json.
    """

    def __init__(self, run_dir: Path, logger: LoggerConfig, resolved_config: dict | None = None,
                 owner: bool | None = None, run_id: str | None = None, plan: RunPlan | None = None,
                 resumed: Resumed | None = None, best_by: str = "val_loss"):
        self.run_dir, self.best_by = Path(run_dir), best_by
        self.owner = context_from_environment().is_main if owner is None else owner
        self.started = time.time()
        self.records: list[dict] = []  # this run's, a resumed run's kept ones included
        start = resumed.iter_num if resumed else 0
        self.progress = TrainingProgress(plan.max_iters if plan else 0, initial=start, enabled=self.owner)
        # A resumed run was told already (and its first evaluation may be long past).
        self.forecast = RunForecast(plan if self.owner and resumed is None else None)
        if not self.owner:
            return
        self.records = keep_records_before(self.run_dir, resumed) if resumed else []
        self.metrics = MetricsLog(self.run_dir)
        # A resumed run passes its logger run's id, so W&B continues that run rather than starting another.
        logger = replace(logger, run_id=run_id or logger.run_id)
        self.logger = start_logger(logger, self.run_dir, resolved_config or {}, purge_step=start)

    def log(self, record: dict) -> None:
        """Record one train or eval record everywhere, and say it in the log."""
        log.info(describe_record(record))
        if record["kind"] == "train":
            self.progress.update_to(record["iter"] + 1, record["loss"])
        if not self.owner:
            return
        self.records.append(record)
        self.metrics.log(record)
        self.logger.log(record, step=record.get("iter", 0))
        if record["kind"] == "eval":
            best = summarise(self.records, best_by=self.best_by)
            if best["best_iter"] == record["iter"]:
                named = ("best_val_loss", "best_iter", "best_by", "best_value")
                self.logger.update_summary({key: best[key] for key in named if key in best})

    def eval_progress(self, done: int, total: int, iteration: int) -> None:
        """Show an evaluation's progress in the bar; time its first batches for the forecast."""
        self.progress.evaluating(done, total, iteration)
        self.forecast.eval_batch_done(done, total)

    @property
    def run_id(self) -> str | None:
        """The logger run's id (kept in checkpoints so a resumed run continues it)."""
        return self.logger.run_id if self.owner else None

    def log_sample(self, text: str) -> None:
        """Record the end-of-run sample text."""
        if self.owner:
            self.logger.log_sample(text, step=self.records[-1].get("iter", 0) if self.records else 0)

    def age_s(self) -> float:
        """Seconds since these records started: the wall time of this piece of the run."""
        return time.time() - self.started

    def summary(self, wall_time_s: float | None = None) -> dict:
        """The run's figures as summary.json holds them, with the wall time given (else age_s())."""
        wall_time_s = round(self.age_s(), 3) if wall_time_s is None else wall_time_s
        return summarise(self.records, wall_time_s=wall_time_s, best_by=self.best_by)

    def close(self, wall_time_s: float | None = None) -> None:
        """Write summary.json and close the metrics file and the logger.

        wall_time_s: the run's, which a resumed run's Trainer counts from its earlier pieces on.
        """
        self.progress.close()
        if not self.owner:
            return
        summary = self.summary(wall_time_s)
        write_atomically(self.run_dir / SUMMARY_FILE,
                         lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        self.logger.update_summary({"wall_time_s": summary["wall_time_s"]})
        self.metrics.close()
        self.logger.finish()
