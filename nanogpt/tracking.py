"""Recording what a run measures: metrics.jsonl, a run summary, and W&B or TensorBoard.

metrics.jsonl in the run directory is always written: one JSON object per line,
easy to read back with pandas or a few lines of Python. At the end of a run,
summary.json holds the figures a sweep table needs (best val loss and its
iteration, wall time, tokens/s). A tracker chosen by ``logger=`` receives the
same records:

- ``wandb`` (the default): a real Weights & Biases run whose files live in
  ``<run dir>/wandb/``. Offline by default, so no account or network is needed
  (``wandb sync`` uploads it later); ``logger.mode=online`` streams it, and falls
  back to offline with one warning when W&B cannot be reached or no one is logged in.
- ``tensorboard``: event files in ``<run dir>/tensorboard/``.
- ``none``: metrics.jsonl and summary.json only.

Only the process that owns the run records anything (rank 0 under torchrun);
the others get a RunTracking that drops what it is given.

A resumed run records each (kind, iteration) once: the records a crashed or
stopped process made after its last checkpoint are dropped from metrics.jsonl
(and TensorBoard's), because the resumed run makes them again.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nanogpt.distributed import context_from_environment
from nanogpt.errors import first_line
from nanogpt.fileio import write_atomically
from nanogpt.options import check_choices, option
from nanogpt.progress import TrainingProgress

log = logging.getLogger("nanogpt.tracking")

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# Older spellings of WANDB_MODE that wandb still accepts.
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
DEFAULT_WANDB_URL = "https://api.wandb.ai"


class MetricsLog:
    """Appends one JSON record per call to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        """Write record as one line, flushed so a crash loses nothing already logged."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
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


# A first run that will take longer than this on its device is told so, with a quicker recipe.
LONG_RUN_S = 15 * 60
QUICKER_RECIPES = {"cpu": "+experiment=shakespeare_char_cpu", "mps": "+experiment=shakespeare_char_cpu"}


@dataclass
class RunPlan:
    """What a run will do, for the duration forecast: steps, evaluations, work per step, device."""

    max_iters: int
    eval_interval: int
    micro_batches: int  # forward/backward passes per step, all processes together
    device: str

    def forecast(self, seconds_per_eval_batch: float, eval_batches: int) -> tuple[float, float]:
        """(whole run, one evaluation) in seconds, from the time of one evaluation batch.

        A training micro-batch (forward and backward) costs about three forward passes.
        """
        evals = self.max_iters // self.eval_interval + 1 + (self.max_iters % self.eval_interval > 0)
        per_eval = eval_batches * seconds_per_eval_batch
        per_step = 3 * self.micro_batches / context_from_environment().world_size * seconds_per_eval_batch
        return self.max_iters * per_step + evals * per_eval, per_eval


class RunForecast:
    """Times the first evaluation's batches and, if the run will take long, says so once, early.

    The first batch is left out (warm-up, compilation); the next few give the
    pace. On a GPU the clock is read after a synchronize, twice per run.
    """

    TIMED = 2

    def __init__(self, plan: RunPlan | None):
        self.plan, self.started, self.done = plan, None, plan is None

    def eval_batch_done(self, done: int, total: int) -> None:
        """Note an evaluation batch; after the timed ones, forecast (once)."""
        if self.done or total <= self.TIMED + 1:
            return
        if done == 1:
            self.started = self.clock()
        elif done == 1 + self.TIMED and self.started is not None:
            self.done = True
            self.say((self.clock() - self.started) / self.TIMED, total)

    def clock(self) -> float:
        """Seconds, with a GPU's queued work done."""
        if self.plan.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def say(self, seconds_per_batch: float, eval_batches: int) -> None:
        """One line if the run will take longer than LONG_RUN_S."""
        total, per_eval = self.plan.forecast(seconds_per_batch, eval_batches)
        if total <= LONG_RUN_S:
            return
        quicker = QUICKER_RECIPES.get(self.plan.device)
        advice = (f"for a first run on this {self.plan.device}, try {quicker} (minutes)" if quicker else
                  "lower max_iters, eval_iters or the model's size for a quicker run")
        log.warning("this run will take about %s on %s (%s per evaluation); %s",
                    duration(total), self.plan.device, duration(per_eval), advice)


def duration(seconds: float) -> str:
    """A duration as people say it: 40 s, 12 min, 3.5 h, 2.1 days."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def tracker_key(record: dict, field: str) -> str | None:
    """The tracker's name for one field of a metrics record ("loss/val", "train/lr"), or None to skip.

    An evaluation's two losses go under loss/ (W&B then charts them side by side);
    they must not share a name with the batch loss logged at the same iteration,
    which would overwrite them.
    """
    if field in ("kind", "iter"):
        return None
    if record.get("kind") == "eval":
        split = field.removesuffix("_loss")
        return f"loss/{split}" if field.endswith("_loss") else f"eval/{field}"
    if field in ("tokens_per_sec", "ms_per_iter", "mfu"):
        return f"perf/{field}"
    return f"train/{field}"


class Tracker:
    """The interface every tracker offers; this base class records nothing (``logger=none``)."""

    run_id: str | None = None  # an id to resume the same tracker run with (W&B only)

    def log(self, record: dict, step: int) -> None:
        """Record the numbers of one metrics record at an iteration."""

    def update_summary(self, values: dict) -> None:
        """Set run-level figures such as the best val loss."""

    def log_sample(self, text: str, step: int) -> None:
        """Record the text the model wrote at the end of the run."""

    def finish(self) -> None:
        """Flush and close."""


class WandbTracker(Tracker):
    """A Weights & Biases run stored in the run directory."""

    def __init__(self, run: Any):
        self.run = run
        self.run_id = run.id

    def log(self, record: dict, step: int) -> None:
        """Log the record's numbers under grouped names, at the record's iteration."""
        values = {key: value for field, value in record.items()
                  if (key := tracker_key(record, field)) and isinstance(value, (int, float))}
        self.run.log(values, step=step)

    def update_summary(self, values: dict) -> None:
        """Write into the run's summary (shown in the W&B runs table)."""
        self.run.summary.update(values)

    def log_sample(self, text: str, step: int) -> None:
        """Keep the sample as a preformatted HTML panel and as summary text."""
        import wandb

        self.run.log({"sample": wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)
        self.run.summary["sample_text"] = text

    def finish(self) -> None:
        """Finish the W&B run (offline: everything is on disk afterwards)."""
        self.run.finish()


class TensorBoardTracker(Tracker):
    """TensorBoard event files in <run dir>/tensorboard/."""

    def __init__(self, run_dir: Path, resolved_config: dict, purge_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an earlier process logged from this step on.
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=purge_step or None)
        config_text = json.dumps(resolved_config, indent=2)
        self.writer.add_text("config", f"```\n{config_text}\n```")

    def log(self, record: dict, step: int) -> None:
        """One scalar per numeric field, at the record's iteration."""
        for field, value in record.items():
            key = tracker_key(record, field)
            if key and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=step)

    def update_summary(self, values: dict) -> None:
        """Summary figures as scalars under summary/, at step 0."""
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"summary/{key}", value, global_step=0)

    def log_sample(self, text: str, step: int) -> None:
        """The sample as a text entry."""
        self.writer.add_text("sample", f"```\n{text}\n```", global_step=step)

    def finish(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def why_wandb_is_unreachable(timeout: float) -> str | None:
    """None when online W&B can work from here; otherwise the reason, in a few words.

    Checked up front, so that a machine without network or login never waits
    on wandb.init's own (long) timeout.
    """
    import requests
    import wandb

    base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL)
    try:
        # Any HTTP answer, even an error status, means the server can be reached.
        requests.head(base_url, timeout=timeout)
    except requests.RequestException as error:
        return f"cannot reach {base_url} ({type(error).__name__})"
    try:
        logged_in = wandb.login(host=base_url, prompt=False, verify=False)
    except Exception as error:  # noqa: BLE001  (any failure here means: not usable online)
        return f"login failed ({type(error).__name__})"
    return None if logged_in else "not logged in (run `wandb login` or set WANDB_API_KEY)"


def start_wandb(logger, run_dir: Path, resolved_config: dict) -> WandbTracker | None:
    """Start a W&B run in run_dir as logger (a LoggerConfig) says; None in disabled mode.

    Online mode that cannot work here falls back to offline with one warning,
    so a missing network or login never stops or stalls training.
    """
    import wandb

    mode = logger.mode
    if mode == "disabled":
        return None
    if mode == "online":
        reason = why_wandb_is_unreachable(logger.init_timeout)
        if reason:
            log.warning("W&B online mode unavailable: %s; logging offline instead (upload later "
                        "with `wandb sync %s/wandb/offline-run-*`)", reason, run_dir)
            mode = "offline"
    arguments = dict(
        dir=str(run_dir), project=logger.project, entity=logger.entity, group=logger.group,
        name=logger.run_name, tags=list(logger.tags) or None, config=resolved_config,
        id=logger.run_id, resume="allow" if logger.run_id else None,
        # silent: W&B's own banner would break "one line per problem" on stderr; we say where it is.
        settings=wandb.Settings(init_timeout=max(logger.init_timeout, 1.0), silent=True),
    )
    try:
        run = wandb.init(mode=mode, **arguments)
    except Exception as error:  # noqa: BLE001  (wandb raises many kinds; none may stop training)
        if mode != "online":
            raise
        log.warning("W&B online run could not start (%s); logging offline instead",
                    first_line(str(error)) or type(error).__name__)
        run = wandb.init(mode="offline", **arguments)
    log.info("W&B run %s (%s) in %s", run.id, run.settings.mode, Path(run.dir).parent)
    return WandbTracker(run)


# logger.name -> how to start that tracker in a run directory. A new tracker is a
# Tracker subclass and one entry here (plus conf/logger/NAME.yaml).
TRACKERS = {
    "wandb": lambda logger, run_dir, config, purge_step: start_wandb(logger, run_dir, config) or Tracker(),
    "tensorboard": lambda logger, run_dir, config, purge_step: TensorBoardTracker(run_dir, config,
                                                                                  purge_step),
    "none": lambda logger, run_dir, config, purge_step: Tracker(),
}


@dataclass
class LoggerConfig:
    """Experiment tracking. metrics.jsonl in the run directory is always written."""

    name: str = option("wandb", "the tracker that receives the run's records", choices=tuple(TRACKERS))
    mode: str = option("offline", "W&B mode (env WANDB_MODE)", choices=("offline", "online", "disabled"))
    project: str = option("nanogpt", "W&B project (env WANDB_PROJECT)")
    entity: str | None = option(None, "W&B team or user; null: your default entity")
    group: str | None = option(None, "null: the sweep's name in a multirun, no group otherwise")
    run_name: str | None = option(None, "null: from the job's overrides")
    tags: list[str] = option(default_factory=list, help="W&B tags")
    run_id: str | None = option(None, "resume this W&B run (by id) instead of starting a new one")
    init_timeout: float = option(10.0, "seconds to wait for W&B before falling back to offline")

    def __post_init__(self):
        self.mode = WANDB_MODE_ALIASES.get(self.mode, self.mode)
        check_choices(self)


def create_tracker(logger: LoggerConfig, run_dir: Path, resolved_config: dict,
                   purge_step: int = 0) -> Tracker:
    """The tracker logger.name asks for, started in run_dir (purge_step: where a resumed run goes on)."""
    return TRACKERS[logger.name](logger, run_dir, resolved_config, purge_step)


def describe_record(record: dict) -> str:
    """The log line of a train or eval record."""
    if record["kind"] == "eval":
        return (f"eval {record['iter']}: train loss {record['train_loss']:.4f}, "
                f"val loss {record['val_loss']:.4f}")
    line = (f"iter {record['iter']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
            f"{record['ms_per_iter']:.1f} ms/iter, {record['tokens_per_sec']:,.0f} tok/s")
    return line + (f", mfu {record['mfu']:.1%}" if "mfu" in record else "")


class RunTracking:
    """Everything a training run records: the log line, progress bar, metrics.jsonl, summary and tracker.

    log() takes the train and eval records the trainer makes; eval records also
    update the best val loss and its iteration in the tracker's summary, so a
    run that dies early still shows its best. close() writes summary.json.
    """

    def __init__(self, run_dir: Path, logger: LoggerConfig, resolved_config: dict | None = None,
                 owner: bool | None = None, run_id: str | None = None, plan: RunPlan | None = None,
                 resumed: Resumed | None = None):
        self.run_dir = Path(run_dir)
        self.owner = context_from_environment().is_main if owner is None else owner
        self.started = time.time()
        self.best_val_loss = math.inf
        self.best_iter: int | None = None
        self.last_iter = 0
        self.last_tokens = 0
        self.tokens_per_sec: list[float] = []
        start = resumed.iter_num if resumed else 0
        self.progress = TrainingProgress(plan.max_iters if plan else 0, initial=start, enabled=self.owner)
        # A resumed run was told already (and its first evaluation may be long past).
        self.forecast = RunForecast(plan if self.owner and resumed is None else None)
        if not self.owner:
            return
        for record in keep_records_before(self.run_dir, resumed) if resumed else []:
            self.note(record)
        self.metrics = MetricsLog(self.run_dir)
        # A resumed run passes its tracker run's id, so W&B continues that run rather than starting another.
        logger = replace(logger, run_id=run_id or logger.run_id)
        self.tracker = create_tracker(logger, self.run_dir, resolved_config or {}, purge_step=start)

    def log(self, record: dict) -> None:
        """Record one train or eval record everywhere, and say it in the log."""
        log.info(describe_record(record))
        if record["kind"] == "train":
            self.progress.update_to(record["iter"] + 1, record["loss"])
        if not self.owner:
            return
        self.metrics.log(record)
        improved = self.note(record)
        self.tracker.log(record, step=self.last_iter)
        if improved:
            self.tracker.update_summary({"best_val_loss": self.best_val_loss, "best_iter": self.best_iter})

    def note(self, record: dict) -> bool:
        """Count a record in the run's figures (also a resumed run's kept ones); True if val improved."""
        self.last_iter = record.get("iter", self.last_iter)
        self.last_tokens = record.get("tokens", self.last_tokens)
        if "tokens_per_sec" in record:
            self.tokens_per_sec.append(record["tokens_per_sec"])
        val_loss = record.get("val_loss")
        if val_loss is not None and val_loss < self.best_val_loss:
            self.best_val_loss, self.best_iter = val_loss, record["iter"]
            return True
        return False

    def eval_progress(self, done: int, total: int, iteration: int) -> None:
        """Show an evaluation's progress in the bar; time its first batches for the forecast."""
        self.progress.evaluating(done, total, iteration)
        self.forecast.eval_batch_done(done, total)

    @property
    def run_id(self) -> str | None:
        """The tracker run's id (kept in checkpoints so a resumed run continues it)."""
        return self.tracker.run_id if self.owner else None

    def log_sample(self, text: str) -> None:
        """Record the end-of-run sample text."""
        if self.owner:
            self.tracker.log_sample(text, step=self.last_iter)

    def summary(self) -> dict:
        """The run's figures as summary.json holds them."""
        return {
            "best_val_loss": self.best_val_loss if self.best_iter is not None else None,
            "best_iter": self.best_iter,
            "iters": self.last_iter,
            "tokens": self.last_tokens,
            "wall_time_s": round(time.time() - self.started, 3),
            # The median ignores the slow first steps (compilation, warm-up).
            "tokens_per_sec": statistics.median(self.tokens_per_sec) if self.tokens_per_sec else None,
        }

    def close(self) -> None:
        """Write summary.json and close the metrics file and the tracker."""
        self.progress.close()
        if not self.owner:
            return
        summary = self.summary()
        write_atomically(self.run_dir / SUMMARY_FILE,
                         lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        self.tracker.update_summary({"wall_time_s": summary["wall_time_s"]})
        self.metrics.close()
        self.tracker.finish()
