"""A preempted or timed-out job requeues and continues exactly: Hydra's submitit launcher, run locally.

submitit's local executor plays SLURM's part: it sends the job SIGUSR2 30 s
before the time limit (SLURM: `signal_delay_s`, via --signal), and starts the job
again when submitit's handler asks for a requeue (SLURM: scontrol requeue). What this cannot show
is SLURM itself (sbatch, scontrol requeue, several nodes): conf/hydra/launcher/
slurm_ddp.yaml's SLURM settings are checked only for what they compose to.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from nanogpt.cli.paths import CONFIG_DIR
from nanogpt.tracking.metrics import read_metrics

from .conftest import REPO, TINY_RUN, register_commands

# Long enough (40 s or more of training on one thread) that the job meets its time-out warning,
# which comes 30 s into each attempt, at least once on any machine; short enough that a slow,
# busy machine (a few thousand iterations an attempt) needs only a few attempts.
MAX_ITERS = 8000
RUN = [*TINY_RUN, "log_interval=500", f"max_iters={MAX_ITERS}", "eval_interval=2000", "sample_tokens=0",
       "logger=none"]


def run(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "nanogpt.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a minute of training per attempt, by design
def test_timed_out_job_requeues_and_auto_resume_finishes_it_exactly(corpus, tmp_path, data_root):
    common = [*RUN, "dataset=text", f"dataset.source={corpus}", f"data_root={data_root}"]
    reference = run([*common, "hydra.run.dir=reference"], tmp_path)
    assert reference.returncode == 0, reference.stderr

    sweep = tmp_path / "sweep"
    # A 1-minute limit, warned 30 s early: about 30 s per attempt, start-up included.
    job = run(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1",
               "+hydra.launcher.max_num_timeout=10",
               f"hydra.sweep.dir={sweep}", "auto_resume=true", *common], tmp_path)
    assert job.returncode == 0, job.stdout + job.stderr
    log = (sweep / "0" / "train.log").read_text()
    stops = log.count("stopped by SIGUSR2 before iteration")
    assert stops >= 1, log
    assert log.count("Requeued job") == stops and log.count("resuming ") == stops
    assert "Job completed successfully" in log

    final = torch.load(sweep / "0" / "last.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "last.pt", weights_only=True)
    worst = max((final["model"][k] - expected["model"][k]).abs().max().item() for k in expected["model"])
    print(f"{stops} time-out(s), requeued and resumed: max |weight difference| vs one run = {worst}")
    assert worst == 0.0 and final["iter_num"] == MAX_ITERS
    keys = [(r["kind"], r["iter"]) for r in read_metrics(sweep / "0")]
    assert len(keys) == len(set(keys))


def test_slurm_preset_requeues_with_a_warning_before_the_limit():
    register_commands()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm_ddp"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
    assert launcher.additional_parameters.requeue is True
    assert launcher.tasks_per_node == launcher.gpus_per_node
