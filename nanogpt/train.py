"""Train a GPT: ``python -m nanogpt.train [overrides]`` (or ``torchrun ... -m nanogpt.train``).

Hydra composes the config into Hydra's run directory; this command turns it
into a TrainConfig, works out whether the run continues an earlier one
(resume=, auto_resume), records the resolved config, and hands over to the
Trainer (nanogpt/training/trainer.py), which is plain Python. Under torchrun
every rank runs here, in rank 0's directory. The run's owner (rank 0) holds the
directory's lock (nanogpt/runtime/rundir.py) until the run ends: a second
process aiming at the same directory is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from nanogpt.cli import resume
from nanogpt.cli.entry import hydra_entry, recorded_config, to_dataclass
from nanogpt.cli.hydra_run_dir import checks_passed
from nanogpt.cli.sweeps import name_tracking_run
from nanogpt.runtime import distributed, rundir
from nanogpt.runtime.device import DeviceConfig
from nanogpt.training.config import TrainConfig
from nanogpt.training.setup import build_trainer


@hydra_entry("train", TrainConfig, rewrite_arguments=resume.resume_arguments)
def train_task(cfg: DictConfig) -> float:
    """Compose the config, validate it, train (or resume) in Hydra's run directory."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    distributed.announce_run_dir(run_dir)  # under torchrun, the other ranks use rank 0's directory
    is_main = distributed.context_from_environment().is_main
    # Claimed already before Hydra wrote here (cli.resume.ResumableRunDir), except for a sweep's job.
    claim = rundir.claim(run_dir, command="train") if is_main else None
    with claim or contextlib.nullcontext():  # let go of the directory when the run ends, however it ends
        if claim and claim.describe_take_over():
            logging.getLogger("nanogpt.train").warning(claim.describe_take_over())
        config = to_dataclass(cfg, TrainConfig)
        config.logger = name_tracking_run(config.logger)
        config.device = share_cores(config.device)
        resolved = recorded_config(cfg, config)  # with the dataset's absolute source and cache name
        resume_state = resume.checkpoint_to_resume(config.resume, config.auto_resume, run_dir, resolved)
        if resume_state is not None and resume.nothing_left(resume_state, config.max_iters):
            # A sweep's job (a single run ends before Hydra writes anything: ResumableRunDir).
            if is_main:
                print(resume.finished_line(resume_state, run_dir), flush=True)
            return resume_state["best_val_loss"]
        overrides = list(HydraConfig.get().overrides.task)
        trainer = build_trainer(config, run_dir, resolved, resume_state, overrides)
        checks_passed(run_dir)  # from here on, what this start wrote in the run directory stays
        if is_main:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        best_val_loss = trainer.run()
        if trainer.stopped_by is not None:
            sys.exit(128 + trainer.stopped_by)  # the shell's convention for "ended by a signal"
        return best_val_loss


def share_cores(device: DeviceConfig) -> DeviceConfig:
    """The device config with threads set to this machine's cores / the jobs a sweep runs side by side.

    torch gives every process one thread per core, so n jobs that the joblib
    launcher runs at once on one machine would each start that many threads and
    fight over the cores (a 2-job sweep then takes nearly as long as running the
    jobs one after the other). A device.threads the user set is kept; a single
    run, a sequential sweep and a launcher that sends jobs to other machines
    (SLURM) keep torch's default.
    """
    hydra_config = HydraConfig.get()
    n_jobs = OmegaConf.select(hydra_config, "launcher.n_jobs", default=None)
    if device.threads is not None or hydra_config.mode != RunMode.MULTIRUN or not n_jobs:
        return device
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 is one job per core
    return replace(device, threads=max(1, cores // jobs))


def main() -> None:
    """Entry point: ``python -m nanogpt.train`` or ``torchrun ... -m nanogpt.train``."""
    distributed.run_with_shared_run_dir(train_task)


if __name__ == "__main__":
    # Run the importable nanogpt.train rather than this __main__ copy, so that launchers which
    # pickle the task (joblib, submitit) can refer to it by name.
    from nanogpt.train import main as importable_main

    importable_main()
