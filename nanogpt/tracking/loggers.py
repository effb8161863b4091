"""Loggers: where a run's records go besides metrics.jsonl (``logger=``): W&B, TensorBoard or nowhere.

- ``wandb`` (the default): a real Weights & Biases run whose files live in
  ``<run dir>/wandb/``. Offline by default, so no account or network is needed
  (``wandb sync`` uploads it later); ``logger.mode=online`` streams it, and falls
  back to offline with one warning when W&B cannot be reached or no one is logged in.
- ``tensorboard``: event files in ``<run dir>/tensorboard/``.
- ``none``: metrics.jsonl and summary.json only.

A new logger is a Logger subclass with its ``name`` (defining it registers it in
LOGGERS, whose keys are the ``logger.name`` choices) and conf/logger/NAME.yaml.
"""

from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from nanogpt.errors import first_line, require_package
from nanogpt.options import check_choices, option

log = logging.getLogger("nanogpt.tracking")

# Older spellings of WANDB_MODE that wandb still accepts.
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
DEFAULT_WANDB_URL = "https://api.wandb.ai"
LOGGERS: dict[str, type[Logger]] = {}  # logger.name -> its Logger class


def logger_key(record: dict, field: str) -> str | None:
    """The logger's name for one field of a metrics record ("loss/val", "train/lr"), or None to skip.

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


class Logger:
    """What every logger offers; this base class records nothing (``logger=none``).

    start() makes one for a run directory; a resumed run passes its purge_step
    (where it goes on) and its logger run's id (config.run_id).
    """

    name: ClassVar[str] = "none"
    run_id: str | None = None  # an id to resume the same logger run with (W&B only)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        LOGGERS[cls.name] = cls

    @classmethod
    def start(cls, config: LoggerConfig, run_dir: Path, resolved_config: dict, purge_step: int = 0) -> Logger:
        return cls()

    def log(self, record: dict, step: int) -> None:
        """Record the numbers of one metrics record at an iteration."""

    def update_summary(self, values: dict) -> None:
        """Set run-level figures such as the best val loss."""

    def log_sample(self, text: str, step: int) -> None:
        """Record the text the model wrote at the end of the run."""

    def finish(self) -> None:
        """Flush and close."""


class WandbLogger(Logger):
    """A Weights & Biases run stored in the run directory."""

    name = "wandb"

    @classmethod
    def start(cls, config: LoggerConfig, run_dir: Path, resolved_config: dict, purge_step: int = 0) -> Logger:
        return start_wandb(config, run_dir, resolved_config) or Logger()

    def __init__(self, run: Any):
        self.run = run
        self.run_id = run.id

    def log(self, record: dict, step: int) -> None:
        """Log the record's numbers under grouped names, at the record's iteration."""
        values = {key: value for field, value in record.items()
                  if (key := logger_key(record, field)) and isinstance(value, (int, float))}
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


class TensorBoardLogger(Logger):
    """TensorBoard event files in <run dir>/tensorboard/."""

    name = "tensorboard"

    @classmethod
    def start(cls, config: LoggerConfig, run_dir: Path, resolved_config: dict, purge_step: int = 0) -> Logger:
        return cls(run_dir, resolved_config, purge_step)

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
            key = logger_key(record, field)
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


LOGGERS[Logger.name] = Logger  # logger=none: metrics.jsonl and summary.json only


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


def start_wandb(logger: LoggerConfig, run_dir: Path, resolved_config: dict) -> WandbLogger | None:
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
    return WandbLogger(run)


@dataclass
class LoggerConfig:
    """Experiment tracking. metrics.jsonl in the run directory is always written."""

    name: str = option("wandb", "where the run's records go besides metrics.jsonl",
                       choices=lambda: tuple(LOGGERS))
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

    def require_packages(self) -> None:
        """The packages the chosen logger needs (checked before a run starts; wandb is always installed)."""
        if self.name == "tensorboard":
            require_package("tensorboard", "tensorboard", "logger=tensorboard")


def start_logger(config: LoggerConfig, run_dir: Path, resolved_config: dict, purge_step: int = 0) -> Logger:
    """The logger config.name asks for, started in run_dir (purge_step: where a resumed run goes on)."""
    return LOGGERS[config.name].start(config, run_dir, resolved_config, purge_step)
