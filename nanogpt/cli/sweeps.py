"""Hydra's side of sweeps: readable job directories, W&B names and groups, and the end-of-sweep report.

``python -m nanogpt.train -m optimizer.lr=1e-3,3e-4`` makes one sweep directory
under ``outputs/sweeps/`` with one directory per job, named after what varies
(``0_optimizer.lr=0.001``). When the sweep ends, SweepReportCallback (configured
in conf/train.yaml under ``hydra.callbacks``) writes the comparison table and the
val-loss plot into the sweep directory and prints the table.

Which keys vary is known only where the sweep starts: on_multirun_start reads
them from the command line and the sweeper's ``params`` and hands them to the
jobs in an environment variable, which local, joblib and SLURM jobs all inherit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nanogpt.cli.overrides import job_overrides, parse_overrides
from nanogpt.tracking.compare import report_sweep

log = logging.getLogger("nanogpt.sweeps")

SWEPT_KEYS_ENV = "NANOGPT_SWEPT_KEYS"
MAX_LABEL_LENGTH = 80
JOB_DIR_RESOLVER = "nanogpt.job_dir"


def swept_keys(task_overrides: list[str], sweeper_params: dict | None) -> list[str]:
    """The keys a sweep varies: sweep overrides (a,b,c / range / choice) and the sweeper's params."""
    keys = [o.key_or_group for o in parse_overrides(task_overrides) if o.is_sweep_override()]
    return keys + [key for key in (sweeper_params or {}) if key not in keys]


def job_label(overrides: list[str], keys: list[str] | None) -> str:
    """A short, file-system-safe name from a job's overrides: only the given keys, if any.

    With no keys known (a single run), every override counts except paths,
    which are long and say little about the experiment.
    """
    parts = []
    for override in parse_overrides(overrides):
        value = override.get_value_element_as_str()
        if keys is not None and override.key_or_group not in keys:
            continue
        if keys is None and ("/" in value or os.sep in value):
            continue
        parts.append(f"{override.key_or_group}={short_number(value)}")
    label = re.sub(r"[^\w.,=+-]+", "_", ",".join(parts))
    return label[:MAX_LABEL_LENGTH]


def short_number(value: str) -> str:
    """A long number (as Optuna samples them) cut to 4 significant digits; other text as it is.

    The exact value stays in the job's .hydra/overrides.yaml and in the sweep table.
    """
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 else f"{number:.4g}"


def announced_swept_keys() -> list[str] | None:
    """The swept keys that on_multirun_start handed to this job, if any."""
    text = os.environ.get(SWEPT_KEYS_ENV)
    return json.loads(text) if text else None


def job_dir_name(job_num: int, overrides: Any) -> str:
    """Resolver for hydra.sweep.subdir: the job number, then what this job varies."""
    plain = OmegaConf.to_container(overrides) if OmegaConf.is_config(overrides) else overrides
    label = job_label(plain or [], announced_swept_keys())
    return f"{job_num}_{label}" if label else str(job_num)


def register_resolvers() -> None:
    """Make ``${nanogpt.job_dir:NUM,OVERRIDES}`` available to the configs."""
    if not OmegaConf.has_resolver(JOB_DIR_RESOLVER):
        OmegaConf.register_new_resolver(JOB_DIR_RESOLVER, job_dir_name)


def name_tracking_run(logger):
    """The logger config (a LoggerConfig) with the W&B group and run name filled in from Hydra's job.

    In a multirun every job shares a group named after the sweep directory and
    is named like its job directory; a single run is named after its overrides.
    Names the user set are kept.
    """
    hydra_config = HydraConfig.get()
    group, name = logger.group, logger.run_name
    if hydra_config.mode == RunMode.MULTIRUN:
        group = group or Path(hydra_config.sweep.dir).name
        name = name or Path(hydra_config.runtime.output_dir).name
    else:
        name = name or job_label(list(hydra_config.overrides.task), None) or None
    return replace(logger, group=group, run_name=name)


class SweepReportCallback(Callback):
    """Announces the swept keys to the jobs, and reports on the sweep when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hand the keys this sweep varies to its jobs (for their directory and run names)."""
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        params = OmegaConf.to_container(params) if params is not None else None
        keys = swept_keys(list(config.hydra.overrides.task), params)
        os.environ[SWEPT_KEYS_ENV] = json.dumps(keys)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write summary.md, summary.csv and val_loss.png into the sweep directory; print the table."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            table, written = report_sweep(sweep_dir, job_overrides)
        except Exception as error:  # noqa: BLE001  (a failed report must not hide the finished jobs)
            log.warning("could not summarise the sweep in %s: %s", sweep_dir, error)
            return
        print(f"\nSweep {sweep_dir}:\n\n{table}\n", flush=True)
        print("wrote " + ", ".join(str(path) for path in written), flush=True)
