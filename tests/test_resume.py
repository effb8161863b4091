"""Stop, crash and resume real training processes; a resumed run must equal an uninterrupted one.

Faults are injected deterministically by tests/faults.py, which patches them into a real run:
a real SIGTERM or SIGINT sent by the process to itself before a chosen step, a
real SIGKILL in the middle of writing a checkpoint, a NaN loss at a chosen step.
The faulty runs are real processes; the runs without faults (the uninterrupted reference,
the resumes and restarts, but for the W&B one) run in the test process (tests/commands.py),
and must still be bitwise what the real processes computed.
"""

import hashlib
import json
import shutil
import signal

import pytest
import torch

from nanogpt.runtime import rundir
from nanogpt.tracking.compare import load_run, table_rows
from nanogpt.tracking.metrics import read_metrics
from nanogpt.weights.checkpoint import load_checkpoint

from .commands import run_in_process
from .conftest import REPO, TINY_RUN, run_module
from .wandb_records import read_offline_run

pytestmark = pytest.mark.slow  # real runs stopped by real signals: minutes of CPU together

# Dropout on and a real learning rate, so every RNG and the optimizer state matter.
RUN = [*TINY_RUN, "model.dropout=0.1", "optimizer.lr=3e-3", "optimizer.warmup_iters=2",
       "max_iters=12", "eval_interval=4"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus, a data root and the arguments every run here shares."""
    work = tmp_path_factory.mktemp("resume")
    corpus = work / "corpus.txt"
    lines = [f"{n}: I am {n}, and I speak of {t}.\n" for n in ("ROMEO", "JULIET", "NURSE")
             for t in ("love", "the moon", "swords")]
    corpus.write_text("".join(lines) * 100)
    return work, [*RUN, "dataset=text", f"dataset.source={corpus}", f"data_root={work / 'data'}"]


def train(work, *args, faults=None):
    """Run ``python -m nanogpt.train`` in work with the shared arguments: a real process if faults."""
    directory, common = work
    if faults:
        env = {"PYTHONPATH": str(REPO)}  # tests/faults.py patches the faults into the real entry point
        return run_module("tests.faults", faults, *common, *args, cwd=directory, env=env)
    return run_in_process("nanogpt.train", *common, *args, cwd=directory)


def resume(work, run_dir, *args):
    """Run ``python -m nanogpt.train resume=run_dir`` (no other arguments but args), in this process."""
    return run_in_process("nanogpt.train", f"resume={run_dir}", *args, cwd=work[0])


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted run's final last.pt."""
    run_dir = work[0] / "reference"
    result = train(work, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return load_checkpoint(run_dir / "last.pt")


def max_weight_difference(a: dict, b: dict) -> float:
    """The largest |a - b| over every weight of two checkpoints."""
    assert a["model"].keys() == b["model"].keys()
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


def assert_same_as_reference(state: dict, reference: dict, label: str) -> None:
    """Bitwise equal weights and optimizer moments, and the same progress."""
    difference = max_weight_difference(state, reference)
    print(f"{label}: max |weight difference| vs uninterrupted run = {difference}")
    assert difference == 0.0
    assert state["iter_num"] == reference["iter_num"] == 12
    assert state["best_val_loss"] == reference["best_val_loss"]
    for key, moments in reference["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state["optimizer"]["state"][key][name], moments[name])


def test_weights_really_depend_on_the_rng(work, reference):
    """The comparison can fail: another seed gives different weights."""
    run_dir = work[0] / "other-seed"
    assert train(work, f"hydra.run.dir={run_dir}", "seed=7").returncode == 0
    assert max_weight_difference(load_checkpoint(run_dir / "last.pt"), reference) > 0


def test_sigterm_then_resume_is_bitwise_exact(work, reference):
    run_dir = work[0] / "sigterm"
    stopped = train(work, f"hydra.run.dir={run_dir}", "logger=wandb", faults="signal_at_iter=6:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert "SIGTERM received: stopping" in stopped.stdout
    assert f"resume with: python -m nanogpt.train resume={run_dir}" in stopped.stdout
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["iter_num"] == 6  # the signal came before step 6: it was not begun, and is next

    # A real process here too: W&B continues its run across two processes, and in this one
    # wandb would leave its service, threads and excepthook behind for the tests after.
    resumed = run_module("nanogpt.train", f"resume={run_dir}", cwd=work[0])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir} from iteration 6" in resumed.stdout
    assert_same_as_reference(load_checkpoint(run_dir / "last.pt"), reference, "SIGTERM at step 6")
    # Every evaluation happened exactly once across the two processes.
    assert [r["iter"] for r in read_metrics(run_dir) if r["kind"] == "eval"] == [0, 4, 8, 12]
    assert not list(run_dir.glob("outputs")) and not (work[0] / "outputs").exists()
    # Both processes wrote to one W&B run: the resumed one continued it by id.
    run_id = saved["training"]["tracker_run_id"]
    assert run_id and load_checkpoint(run_dir / "last.pt")["training"]["tracker_run_id"] == run_id
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(d.name.endswith(f"-{run_id}") for d in wandb_runs)
    assert {read_offline_run(d).run_id for d in wandb_runs} == {run_id}


def test_sigkill_while_saving_keeps_the_previous_checkpoint_then_auto_resume_is_exact(work, reference):
    run_dir = work[0] / "killed"
    job = [f"hydra.run.dir={run_dir}", "auto_resume=true"]  # a preempted job restarts as it started
    killed = train(work, *job, faults="kill_during_save=3")  # last.pt is written at 0, 4, then 8
    assert killed.returncode == -signal.SIGKILL
    leftovers = list(run_dir.glob(".last.pt.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written file
    assert load_checkpoint(run_dir / "last.pt")["iter_num"] == 4

    restarted = train(work, *job)
    assert restarted.returncode == 0, restarted.stderr
    assert f"resuming {run_dir} from iteration 4" in restarted.stdout
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_as_reference(load_checkpoint(run_dir / "last.pt"), reference, "SIGKILL during save")


def test_second_ctrl_c_aborts_at_once(work):
    run_dir = work[0] / "ctrl-c-twice"
    aborted = train(work, f"hydra.run.dir={run_dir}", faults="signal_at_iter=6:SIGINT*2")
    assert aborted.returncode == 128 + signal.SIGINT
    assert "Traceback" not in aborted.stderr
    assert "aborted at once during iteration 6" in aborted.stdout
    assert load_checkpoint(run_dir / "last.pt")["iter_num"] == 4  # no checkpoint of the aborted step
    assert not list(run_dir.glob(".*.tmp"))


def test_nan_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(work):
    run_dir = work[0] / "nan"
    result = train(work, f"hydra.run.dir={run_dir}", faults="nan_loss_at_iter=6")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: the training loss became nan at iteration 6")
    assert f"{run_dir / 'last.pt'} (iteration 4)" in error[0]
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["iter_num"] == 4
    assert all(torch.isfinite(w).all() for w in saved["model"].values())


def test_resume_refuses_changes_of_meaning_and_allows_extending(work, reference):
    run_dir = work[0] / "extend"
    shutil.copytree(work[0] / "reference", run_dir)
    before = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    changes = (("model.n_layer=3", "model.n_layer"), ("dataset.val_fraction=0.2", "dataset.val_fraction"),
               ("optimizer.lr=1e-2", "optimizer.lr"), ("seed=1", "seed"))
    for change, key in changes:
        refused = resume(work, run_dir, change)
        assert refused.returncode == 2, change
        assert refused.stderr.startswith(f"error: resume: {key}=") and "start a new run" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == before  # refused before Hydra wrote

    extended = resume(work, run_dir, "max_iters=16", "eval_interval=2")
    assert extended.returncode == 0, extended.stderr
    state = load_checkpoint(run_dir / "last.pt")
    assert state["iter_num"] == 16
    assert state["config"]["model"]["n_layer"] == 2  # the run's own overrides still apply
    assert [r["iter"] for r in read_metrics(run_dir) if r["kind"] == "eval"] == [0, 4, 8, 12, 14, 16]


def test_signal_during_evaluation_abandons_it_and_resume_is_bitwise_exact(work, reference):
    run_dir = work[0] / "stop-in-eval"
    stopped = train(work, f"hydra.run.dir={run_dir}", faults="signal_in_eval=8:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert "eval 8:" not in stopped.stdout  # abandoned, not finished
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["iter_num"] == 8 and saved["training"]["last_eval_iter"] == 4  # 8 steps done, eval 8 not
    last_line = stopped.stdout.strip().splitlines()[-1]
    assert last_line == (f"stopped by SIGTERM before iteration 8: saved {run_dir / 'last.pt'}; "
                         f"resume with: python -m nanogpt.train resume={run_dir}")

    resumed = resume(work, run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(load_checkpoint(run_dir / "last.pt"), reference, "SIGTERM during evaluation")
    assert [r["iter"] for r in read_metrics(run_dir) if r["kind"] == "eval"] == [0, 4, 8, 12]


def test_signal_in_the_middle_of_a_step_abandons_it_and_resume_is_bitwise_exact(work, reference):
    run_dir = work[0] / "stop-mid-step"
    stopped = train(work, f"hydra.run.dir={run_dir}", faults="signal_mid_step=6:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Traceback" not in stopped.stderr
    # Step 6 had run its forward pass and drawn the next batch: all of it was put back.
    assert load_checkpoint(run_dir / "last.pt")["iter_num"] == 6
    resumed = resume(work, run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(load_checkpoint(run_dir / "last.pt"), reference, "SIGTERM mid-step")


def test_sigkill_then_auto_resume_records_every_metric_once(work, reference):
    run_dir = work[0] / "killed-metrics"
    job = [f"hydra.run.dir={run_dir}", "auto_resume=true", "log_interval=1", "logger=tensorboard"]
    killed = train(work, *job, faults="kill_at_iter=11")
    assert killed.returncode == -signal.SIGKILL
    before = read_metrics(run_dir)
    assert [r["iter"] for r in before if r["kind"] == "train"] == list(range(11))  # 8, 9, 10 unsaved
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "it')  # a line torn by the kill

    restarted = train(work, *job)
    assert restarted.returncode == 0, restarted.stderr
    records = read_metrics(run_dir)
    keys = [(r["kind"], r["iter"]) for r in records]
    assert len(keys) == len(set(keys)), "a (kind, iter) recorded twice"
    assert [r["iter"] for r in records if r["kind"] == "train"] == list(range(12))
    assert [r["iter"] for r in records if r["kind"] == "eval"] == [0, 4, 8, 12]
    # The records before the checkpoint are the killed process's own, untouched.
    assert records[:len(before) - 3] == before[:-3] and before[-3]["iter"] == 8
    assert_same_as_reference(load_checkpoint(run_dir / "last.pt"), reference, "SIGKILL, auto_resume")


def tree(folder) -> dict[str, str]:
    """Every file and folder under folder: a file by the sha256 of its bytes, a folder as '/'."""
    return {str(p.relative_to(folder)): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def test_a_finished_run_resumed_says_so_in_one_line_and_changes_nothing(work, reference):
    run_dir = work[0] / "finished"
    shutil.copytree(work[0] / "reference", run_dir)
    before = tree(run_dir)
    finished = (f"{run_dir} has finished: it trained to iteration 12 and evaluated there (best val loss "
                f"{reference['best_val_loss']:.4f}); nothing to do, so nothing was changed. To train it "
                f"further, raise max_iters: python -m nanogpt.train resume={run_dir} max_iters=N "
                "(N above 12)")
    attempts = {
        "resume=": resume(work, run_dir),
        "resume= with a tracker and a sample": resume(work, run_dir, "logger=wandb", "sample_tokens=50"),
        "resume= with the same max_iters": resume(work, run_dir, "max_iters=12"),
        "auto_resume=true": train(work, f"hydra.run.dir={run_dir}", "auto_resume=true"),
    }
    for what, result in attempts.items():
        assert result.returncode == 0, f"{what}: {result.stderr}"
        assert result.stdout.strip().splitlines() == [finished] and result.stderr == "", what
    assert tree(run_dir) == before  # no W&B run, sample, config.yaml or summary.json: not one byte

    extended = resume(work, run_dir, "max_iters=14")  # raised: it trains on
    assert extended.returncode == 0, extended.stderr
    assert load_checkpoint(run_dir / "last.pt")["iter_num"] == 14


def test_a_resume_refused_after_hydra_wrote_puts_back_what_it_rewrote(work, reference):
    run_dir = work[0] / "refused-late"
    shutil.copytree(work[0] / "reference", run_dir)
    # Another data root whose folder of that name holds other tokens: refused once the data is opened,
    # after Hydra rewrote .hydra/ and opened the log.
    other_root, other_text = work[0] / "other-data", work[0] / "other.txt"
    other_text.write_text("Some other text altogether, of another play.\n" * 300)
    name = reference["config"]["dataset"]["name"]
    prepared = run_in_process("nanogpt.data", "dataset=text", f"dataset.source={other_text}",
                              f"dataset.name={name}", f"data_root={other_root}", cwd=work[0])
    assert prepared.returncode == 0, prepared.stderr
    before = tree(run_dir)
    refused = resume(work, run_dir, "max_iters=16", f"data_root={other_root}")
    assert refused.returncode == 2 and "now holds other tokens than this run trained on" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert tree(run_dir) == before


def test_only_a_run_of_ours_starts_again_where_it_stopped_before_its_first_checkpoint(work, tmp_path):
    run_dir = work[0] / "early"
    job = [f"hydra.run.dir={run_dir}", "auto_resume=true", "eval_at_start=false"]
    killed = train(work, *job, faults="kill_at_iter=2")  # as a preempted job, before any checkpoint
    assert killed.returncode == -signal.SIGKILL and not (run_dir / "last.pt").exists()
    assert json.loads((run_dir / rundir.RUN_MARKER).read_text())["command"] == "train"

    # The same files without our marker: another program's run (its .hydra/, config.yaml, train.log).
    theirs = tmp_path / "theirs"
    shutil.copytree(run_dir, theirs)
    (theirs / rundir.RUN_MARKER).unlink()
    before = tree(theirs)
    refused = train(work, *job[1:], f"hydra.run.dir={theirs}")
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: {theirs} already holds .hydra, ")
    assert "which no nanogpt run wrote" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert tree(theirs) == before

    restarted = train(work, *job)  # ours: started again in its directory, as a requeued job is
    assert restarted.returncode == 0, restarted.stderr
    assert load_checkpoint(run_dir / "last.pt")["iter_num"] == 12


def test_a_resumed_runs_wall_time_adds_up_every_piece(work, reference):
    run_dir = work[0] / "pieces"
    stopped = train(work, f"hydra.run.dir={run_dir}", faults="signal_at_iter=6:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    first = json.loads((run_dir / "summary.json").read_text())["wall_time_s"]
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert 0 < saved["training"]["wall_time_s"] <= first  # the checkpoint's clock, at the stop
    # Say the first piece had taken 1000 s: the resumed run must count them (the last piece takes seconds).
    saved["training"]["wall_time_s"] = 1000.0
    torch.save(saved, run_dir / "last.pt")

    resumed = resume(work, run_dir)
    assert resumed.returncode == 0, resumed.stderr
    total = json.loads((run_dir / "summary.json").read_text())["wall_time_s"]
    assert 1000.0 < total < 1000.0 + 600
    assert load_checkpoint(run_dir / "last.pt")["training"]["wall_time_s"] > 1000.0
    header, rows = table_rows([load_run(run_dir)])  # what the sweep tables and nanogpt.report show
    assert rows[0][header.index("wall time (s)")] == f"{total:.1f}"
