"""Sweeps through the real ``python -m nanogpt.train -m``: job dirs, W&B runs, summaries, report.

The commands run their main() in the test process (tests/commands.py); the joblib launcher's jobs run
in its worker processes, as they would from a shell.
"""

import csv
import json
import os
import shutil

import pytest
import torch

from nanogpt.cli.sweeps import job_label, swept_keys
from nanogpt.tracking.compare import job_sort_key

from .commands import run_in_process
from .conftest import TINY_RUN
from .wandb_records import read_offline_run

pytestmark = pytest.mark.slow  # real multiruns: minutes of CPU together

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = [*TINY_RUN, "logger=wandb", "max_iters=30", "eval_interval=10", "optimizer.warmup_iters=2"]


def text_dataset(corpus, data_root):
    """Overrides that train on the small corpus with an isolated data root."""
    return ["dataset=text", f"dataset.source={corpus}", "dataset.name=toy", f"data_root={data_root}"]


def job_dirs(sweep_dir):
    """The job directories of a sweep, in job order."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=job_sort_key)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real multirun of two tiny jobs, W&B offline (the default logger)."""
    work = tmp_path_factory.mktemp("sweep")
    corpus = work / "corpus.txt"
    corpus.write_text("".join(f"{n}: I speak of {t}.\n" for n in ("ROMEO", "JULIET", "NURSE")
                              for t in ("love", "the moon", "Verona")) * 150)
    result = run_in_process("nanogpt.train", "-m", *QUICK, *text_dataset(corpus, work / "data"),
                            "optimizer.lr=3e-3,1e-4", cwd=work)
    assert result.returncode == 0, result.stderr
    (sweep_dir,) = (work / "outputs" / "sweeps").iterdir()
    return work, sweep_dir, result


def test_each_job_has_its_own_complete_directory(sweep):
    _, sweep_dir, _ = sweep
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0_optimizer.lr=0.003", "1_optimizer.lr=0.0001"]
    for job in jobs:
        for name in ("config.yaml", "train.log", "metrics.jsonl", "summary.json", "best.pt", "last.pt",
                     ".hydra/overrides.yaml"):
            assert (job / name).is_file(), (job, name)
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1


def test_wandb_runs_hold_history_summary_and_config(sweep):
    _, sweep_dir, _ = sweep
    for job in job_dirs(sweep_dir):
        (offline_dir,) = (job / "wandb").glob("offline-run-*")
        run = read_offline_run(offline_dir)
        assert run.group == sweep_dir.name and run.name == job.name and run.project == "nanogpt"
        assert "model" in run.config and "optimizer" in run.config
        val_steps = [h["_step"] for h in run.history if "loss/val" in h and "loss/train" in h]
        assert val_steps == [0, 10, 20, 30]
        train_keys = set().union(*(h.keys() for h in run.history if "train/loss" in h))
        assert {"train/lr", "train/grad_norm", "perf/tokens_per_sec"} <= train_keys
        summary = json.loads((job / "summary.json").read_text())
        assert run.summary["best_val_loss"] == pytest.approx(summary["best_val_loss"])
        assert run.summary["best_iter"] == summary["best_iter"]
        assert run.summary["sample_text"].strip()  # the end-of-run sample
        assert list(offline_dir.glob("files/media/html/sample_*.html"))


def test_summary_table_ranks_jobs_and_is_printed(sweep):
    _, sweep_dir, result = sweep
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [row["optimizer.lr"] for row in rows] == ["0.003", "0.0001"]  # lr 1e-4 learns far less in 30 steps
    losses = [float(row["best val loss"]) for row in rows]
    assert losses == sorted(losses)
    for row in rows:
        summary = json.loads((sweep_dir / row["run"] / "summary.json").read_text())
        assert float(row["best val loss"]) == pytest.approx(summary["best_val_loss"], abs=1e-4)
        assert float(row["wall time (s)"]) > 0 and float(row["tokens/s"].replace(",", "")) > 0
    table = (sweep_dir / "summary.md").read_text()
    assert table.strip() in result.stdout
    assert (sweep_dir / "val_loss.png").read_bytes().startswith(PNG_MAGIC)


def test_report_on_a_run_dir_writes_its_loss_curve(sweep):
    work, sweep_dir, _ = sweep
    job = job_dirs(sweep_dir)[0]
    result = run_in_process("nanogpt.report", str(job), cwd=work)
    assert result.returncode == 0, result.stderr
    assert (job / "loss_curve.png").read_bytes().startswith(PNG_MAGIC)
    assert "best val loss" in result.stdout


def test_report_on_a_sweep_dir_rewrites_table_and_plot(sweep):
    work, sweep_dir, _ = sweep
    for name in ("summary.md", "summary.csv", "val_loss.png"):
        (sweep_dir / name).unlink()
    result = run_in_process("nanogpt.report", str(sweep_dir), cwd=work)
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "val_loss.png").read_bytes().startswith(PNG_MAGIC)
    assert result.stdout.strip() == (sweep_dir / "summary.md").read_text().strip()
    assert len(list(csv.DictReader((sweep_dir / "summary.csv").open()))) == 2


def test_report_compares_several_paths(sweep, tmp_path):
    work, sweep_dir, _ = sweep
    jobs = job_dirs(sweep_dir)
    out = tmp_path / "comparison"
    result = run_in_process("nanogpt.report", str(jobs[1]), str(jobs[0]), "--out", str(out), cwd=work)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [row["run"] for row in rows] == [jobs[0].name, jobs[1].name]  # ranked, not in argument order
    assert (out / "val_loss.png").is_file()


def test_report_on_a_missing_path_fails_with_one_line(tmp_path):
    result = run_in_process("nanogpt.report", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'} does not exist; "
                                                  "give a run directory or a sweep directory"]


def test_joblib_runs_jobs_in_parallel_and_prepares_data_once(tmp_path, corpus, data_root):
    from joblib.externals.loky import get_reusable_executor

    try:  # the jobs run in joblib's worker processes; the launcher, in this one
        result = run_in_process("nanogpt.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                *QUICK, "max_iters=10", "logger=none", *text_dataset(corpus, data_root),
                                "seed=1,2", cwd=tmp_path)
    finally:  # as the launcher's process would at its exit: its workers end now, not when idle long enough
        get_reusable_executor().shutdown(wait=True)
    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "sweeps").iterdir()
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0_seed=1", "1_seed=2"]
    logs = [(job / "train.log").read_text() for job in jobs]
    assert sum("prepared toy" in log for log in logs) == 1  # one job prepared, the other reused
    for log, job in zip(logs, jobs, strict=True):
        assert "best val loss" in log and (job / "best.pt").is_file()
        assert f"{max(1, len(os.sched_getaffinity(0)) // 2)} threads" in log  # the cores are shared out


def test_optuna_search_minimises_the_best_val_loss(tmp_path, corpus, data_root):
    # Not QUICK: it fixes optimizer.warmup_iters, which the search varies.
    result = run_in_process("nanogpt.train", "-m", "+experiment=lr_search", "hydra.sweeper.n_trials=2",
                            *TINY_RUN, "max_iters=10", "eval_interval=5",
                            *text_dataset(corpus, data_root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "sweeps").iterdir()
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 2 and all(job.name.startswith(f"{i}_optimizer.lr=") for i, job in enumerate(jobs))
    from omegaconf import OmegaConf

    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    best = min(json.loads((job / "summary.json").read_text())["best_val_loss"] for job in jobs)
    assert results.best_value == pytest.approx(best)
    assert set(results.best_params) == {"optimizer.lr", "optimizer.warmup_iters"}
    assert (sweep_dir / "summary.csv").is_file()


def test_lr_sweep_recipe_composes_three_jobs_on_the_cpu_recipe():
    from hydra import compose, initialize_config_dir

    from nanogpt.cli.entry import register_configs
    from nanogpt.cli.paths import CONFIG_DIR
    from nanogpt.training.config import TrainConfig

    register_configs("train", TrainConfig)  # as nanogpt.train registers its own when it starts
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=lr_sweep"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["optimizer.lr"] == "3e-3,1e-3,3e-4"
    assert (cfg.model.n_layer, cfg.batch_size, cfg.max_iters) == (4, 12, 2000)
    assert swept_keys([], dict(cfg.hydra.sweeper.params)) == ["optimizer.lr"]


def test_job_labels_keep_swept_keys_and_drop_paths():
    overrides = ["optimizer.lr=0.001", "dataset.source=/tmp/a b/c.txt", "+experiment=lr_sweep", "seed=3"]
    assert swept_keys(["optimizer.lr=1e-3,3e-4", "seed=3"], None) == ["optimizer.lr"]
    assert job_label(overrides, ["optimizer.lr"]) == "optimizer.lr=0.001"
    assert job_label(overrides, None) == "optimizer.lr=0.001,experiment=lr_sweep,seed=3"
    assert job_label(["optimizer.lr=0.0003342330176505329", "model=tiny"], ["optimizer.lr", "model"]) == \
        "optimizer.lr=0.0003342,model=tiny"


def test_a_resumed_sweep_adds_up_each_jobs_pieces_and_a_finished_one_changes_nothing(sweep, tmp_path):
    work, sweep_dir, _ = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    jobs = job_dirs(copy)
    earlier = []  # each job's wall time up to its checkpoint; say the first job's first piece took 1000 s
    for number, job in enumerate(jobs):
        state = torch.load(job / "last.pt", weights_only=True)
        state["training"]["wall_time_s"] = 1000.0 if number == 0 else state["training"]["wall_time_s"]
        torch.save(state, job / "last.pt")
        earlier.append(state["training"]["wall_time_s"])
    again = [*QUICK, "logger=none", *text_dataset(work / "corpus.txt", work / "data"),
             "optimizer.lr=3e-3,1e-4", "auto_resume=true", "max_iters=32", f"hydra.sweep.dir={copy}"]
    resumed = run_in_process("nanogpt.train", "-m", *again, cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    rows = list(csv.DictReader((copy / "summary.csv").open()))
    for job, before in zip(jobs, earlier, strict=True):
        assert torch.load(job / "last.pt", weights_only=True)["iter_num"] == 32
        total = json.loads((job / "summary.json").read_text())["wall_time_s"]
        assert before < total < before + 600  # the earlier piece and this one
        (row,) = [row for row in rows if row["run"] == job.name]
        assert row["wall time (s)"] == f"{total:.1f}"

    ours = ("summary.json", "config.yaml", "metrics.jsonl", "last.pt", "best.pt")
    files = {(job.name, name): (job / name).read_bytes() for job in jobs for name in ours}
    finished = run_in_process("nanogpt.train", "-m", *again, cwd=work)
    assert finished.returncode == 0, finished.stderr
    said = [line.split(" has finished")[0] for line in finished.stdout.splitlines() if "has finished" in line]
    assert said == [str(job) for job in jobs]
    assert {(job.name, name): (job / name).read_bytes() for job in jobs for name in ours} == files
    assert list(csv.DictReader((copy / "summary.csv").open())) == rows
