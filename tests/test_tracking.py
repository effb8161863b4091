"""Trackers through real training runs: none, TensorBoard, W&B online fallback; the first run's forecast.

Each run is ``python -m nanogpt.train``'s main() called in the test process (tests/commands.py).
The forecast's arithmetic and advice are checked on a clock that reads given times
(tests/test_stops.py waits for a real run's forecast line).
"""

import itertools
import logging
import socket

from nanogpt.cli.paths import EXPERIMENTS_DIR
from nanogpt.tracking.forecast import QUICKER_RECIPE, RunForecast, RunPlan, duration
from nanogpt.tracking.metrics import read_metrics
from nanogpt.tracking.records import RunRecords

from .commands import run_in_process
from .conftest import TINY_RUN
from .wandb_records import read_offline_run

QUICK = [*TINY_RUN, "logger=wandb", "max_iters=10", "eval_interval=5", "sample_tokens=0"]


def train_once(tmp_path, corpus, data_root, *args, env=None):
    """One quick run; returns (process, run directory)."""
    result = run_in_process("nanogpt.train", *QUICK, "dataset=text", f"dataset.source={corpus}",
                            f"data_root={data_root}", *args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    return result, run_dir


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_logger_none_writes_metrics_and_no_wandb_files(tmp_path, corpus, data_root):
    _, run_dir = train_once(tmp_path, corpus, data_root, "logger=none")
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("*.wandb"))
    assert [r["iter"] for r in read_metrics(run_dir) if r["kind"] == "eval"] == [0, 5, 10]
    assert (run_dir / "summary.json").is_file()


def test_online_mode_without_network_falls_back_to_offline(tmp_path, corpus, data_root):
    env = {"WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}", "WANDB_API_KEY": "x" * 40}
    result, run_dir = train_once(tmp_path, corpus, data_root, "logger.mode=online", env=env)
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "W&B online mode unavailable" in line]
    assert len(warnings) == 1 and "logging offline instead" in warnings[0], output
    (offline_dir,) = (run_dir / "wandb").glob("offline-run-*")
    run = read_offline_run(offline_dir)
    assert [h["_step"] for h in run.history if "loss/val" in h] == [0, 5, 10]
    assert "best val loss" in (run_dir / "train.log").read_text()


def test_wandb_environment_variables_keep_their_meaning(tmp_path, corpus, data_root):
    env = {"WANDB_MODE": "disabled", "WANDB_PROJECT": "shakespeare-lab"}
    _, run_dir = train_once(tmp_path, corpus, data_root, env=env)
    assert not (run_dir / "wandb").exists()  # disabled: no W&B files at all
    assert "project: shakespeare-lab" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "metrics.jsonl").is_file()


def test_tensorboard_writes_event_files_in_the_run_dir(tmp_path, corpus, data_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = train_once(tmp_path, corpus, data_root, "logger=tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/val")] == [0, 5, 10]
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec"} <= scalars
    assert not (run_dir / "wandb").exists()


def test_bad_logger_fails_before_any_work(tmp_path, corpus, data_root):
    result = run_in_process("nanogpt.train", *QUICK, "dataset=text", f"dataset.source={corpus}",
                            f"data_root={data_root}", "logger.mode=sometimes", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: logger.mode='sometimes' is not one of offline, online, disabled"]
    assert not list(data_root.iterdir()) and not list(tmp_path.glob("outputs/*/*"))


def test_only_the_owning_process_records(tmp_path):
    from nanogpt.tracking.loggers import LoggerConfig

    other_rank = RunRecords(tmp_path, LoggerConfig(name="wandb"), {}, owner=False)
    other_rank.log({"kind": "eval", "iter": 0, "val_loss": 1.0, "train_loss": 1.0})
    other_rank.close()
    assert list(tmp_path.iterdir()) == []


class ScriptedClock(RunForecast):
    """A forecast whose clock reads the given times, one per evaluation batch: what the pace is made of."""

    def __init__(self, plan: RunPlan, batch_seconds: list[float]):
        super().__init__(plan)
        self.readings = iter(itertools.accumulate(batch_seconds))

    def clock(self) -> float:
        return next(self.readings)


def forecast_line(plan: RunPlan, batch_seconds: list[float], caplog) -> str | None:
    """The line a first evaluation of 1000 batches, each taking batch_seconds[i], makes the run say."""
    forecast = ScriptedClock(plan, batch_seconds)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanogpt.tracking"):
        for done in range(1, len(batch_seconds) + 1):
            forecast.eval_batch_done(done, 1000)
    lines = [r.getMessage() for r in caplog.records if "this run will take" in r.getMessage()]
    assert len(lines) <= 1
    return lines[0] if lines else None


def test_the_forecast_points_at_the_quicker_recipe_that_exists_never_the_one_running(caplog):
    assert (EXPERIMENTS_DIR / f"{QUICKER_RECIPE}.yaml").is_file()
    slow = [1.0] * 8  # a second a batch: hours for 10,000 steps and their evaluations
    quicker = f"try +experiment={QUICKER_RECIPE} (under a minute)"
    shorter = "lower max_iters, eval_iters or the model's size for a quicker run"
    for device, overrides, advice in (
            ("cpu", (), quicker), ("cpu", ("+experiment=shakespeare_char_cpu",), quicker),
            ("mps", ("model=small",), quicker), ("cpu", (f"+experiment={QUICKER_RECIPE}",), shorter),
            ("cuda", (), shorter)):
        line = forecast_line(RunPlan(10_000, 250, 1, device, overrides=overrides), slow, caplog)
        assert line is not None and line.endswith(advice), (device, overrides, line)
        if overrides and overrides[0].endswith(QUICKER_RECIPE):
            assert "+experiment=" not in line  # never the recipe already running


def test_the_forecast_takes_the_pace_of_several_batches_not_of_one_slowed_down(caplog):
    plan = RunPlan(10_000, 250, 1, "cpu", eval_at_start=False)
    # Batch 1 is left out (warm-up); batch 2 was slowed by another program: the median of 2-6 is 1 s.
    line = forecast_line(plan, [30.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0], caplog)
    total, per_eval = plan.forecast(1.0, 1000)
    assert line.startswith(f"this run will take about {duration(total)} on cpu ({duration(per_eval)} "
                           "per evaluation)"), line
    assert total == 10_000 * 3 + 40 * 1000  # 10,000 steps of 3 batches' work; 40 evaluations, none at 0
    assert RunPlan(10_000, 250, 1, "cpu").forecast(1.0, 1000)[0] == total + 1000  # one at 0 too
    assert forecast_line(RunPlan(100, 50, 1, "cpu"), [0.01] * 8, caplog) is None  # short: nothing said
