"""Resuming a run from the command line: where from, and what may change.

What a last.pt holds, and how it is put back, is the Trainer's (Trainer.state_dict;
training/state.py's SavedRun reads it back). ``python -m nanogpt.train
resume=RUN_DIR_OR_CKPT [safe overrides]`` re-composes the run's own overrides, lets
the new ones replace theirs, refuses any change to what the run means (model,
dataset, optimizer, seed, batch) and trains on in the same run directory.
``auto_resume=true`` does the same for a run whose (fixed) run directory already
holds a last.pt, as a preempted cluster job restarts. Each process reads the
last.pt once: the command line's rewrite and the run directory's claim
(ResumableRunDir, which checks a resume before Hydra writes anything) keep
what they read for the task. A run with nothing left to do (it reached
max_iters and evaluated there) is left as it is, with one line saying so.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from nanogpt.cli.entry import recorded_config, to_dataclass
from nanogpt.cli.hydra_run_dir import ClaimRunDir, NothingToDo
from nanogpt.cli.overrides import flatten, parse_overrides, quote
from nanogpt.cli.paths import CONFIG_DIR
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.runtime.distributed import check_world_size, context_from_environment, launch_command
from nanogpt.training.config import TrainConfig
from nanogpt.training.state import SavedRun
from nanogpt.weights.checkpoint import LAST

log = logging.getLogger("nanogpt.resume")

# Config keys (and groups) that define what a run is; a resumed run must keep them.
MEANING_KEYS = ("model", "dataset", "optimizer", "lora", "objective", "seed", "batch_size",
                "gradient_accumulation_steps")
SAFE_EXAMPLES = "max_iters, eval_interval, eval_iters, log_interval, sample_tokens, device, logger, data_root"
# last.pt files this process has read (while rewriting its command line), kept for its task.
_read: dict[Path, SavedRun] = {}


# ---------------------------------------------------------------- where to resume from


def resume_checkpoint_path(target: str | Path) -> Path:
    """The checkpoint to resume from: a run directory's last.pt, or the file given."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / LAST).is_file():
            raise CheckpointError(
                f"resume={target}: the directory holds no {LAST}; give a run directory that a "
                "training run wrote, or its last.pt"
            )
        return (path / LAST).resolve()
    if path.is_file():
        return path.resolve()
    raise CheckpointError(f"resume={target} does not exist; give a run directory or its last.pt")


def saved_run(path: Path) -> SavedRun:
    """The last.pt at path, read once per process."""
    path = path.resolve()
    if path not in _read:
        _read[path] = SavedRun.read(path)
    return _read[path]


def check_resume_compatible(saved: dict, new: dict) -> None:
    """Raise ConfigError if new changes a key that defines the saved run.

    A key the saved run does not have (it predates the option) had the schema's default.
    dataset.name only says where the tokens are cached (their sha256 in the
    checkpoint says which they are), and a source path means the file it resolves to.
    """
    old_flat, new_flat = flatten(saved), flatten(new)
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if key.split(".")[0] not in MEANING_KEYS or key == "dataset.name":
            continue
        old, value = old_flat.get(key, defaults.get(key, "<absent>")), new_flat.get(key, "<absent>")
        if key == "dataset.source" and same_path(old, value):
            continue
        if old != value:
            raise ConfigError(
                f"resume: {key}={value} would change the run, which has {key}={old}; a resumed run "
                f"keeps its model, dataset, optimizer, lora, objective, seed and batch (safe to change: "
                f"{SAFE_EXAMPLES}); "
                "start a new run to change it"
            )


def same_path(a: object, b: object) -> bool:
    """True when two source values name the same local file or folder (one may be relative)."""
    if not (isinstance(a, str) and isinstance(b, str)) or "://" in a + b:
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def resume_path(resume: str | None, auto_resume: bool, run_dir: Path) -> Path | None:
    """The last.pt a run continues from (resume=, or auto_resume=true's in run_dir), or None: a new run."""
    if resume:
        return resume_checkpoint_path(resume)
    if auto_resume and (run_dir / LAST).is_file():
        return run_dir / LAST
    return None


def checked_saved_run(path: Path, config: dict) -> SavedRun:
    """The last.pt at path (read once per process), refused if config changes the run or its job size."""
    saved = saved_run(path)
    check_resume_compatible(saved.config, config)
    world_size = context_from_environment().world_size
    sharded_job = world_size > 1 and config.get("distributed", {}).get("strategy") == "fsdp"
    check_world_size(saved.world_size, world_size, sharded=saved.sharded or sharded_job)
    return saved


def checkpoint_to_resume(resume: str | None, auto_resume: bool, run_dir: Path, config: dict) -> dict | None:
    """The training state to continue from, checked against config; None to start afresh."""
    path = resume_path(resume, auto_resume, run_dir)
    if path is None:
        return None
    saved = checked_saved_run(path, config)
    _read.pop(saved.path)  # the Trainer takes it from here; nothing else keeps the weights alive
    if context_from_environment().is_main and not nothing_left(saved.state, config.get("max_iters")):
        log.info("resuming %s from iteration %d (%s)", run_dir, saved.iter_num, path)
    return saved.state


def nothing_left(state: dict, max_iters: int | None) -> bool:
    """True when a run resumed from state would only end: it is at max_iters or past it, and evaluated there.

    (A run stopped after its last step but before its last evaluation still has that evaluation to do.)
    """
    return max_iters is not None and state["iter_num"] >= max_iters \
        and state["training"].get("last_eval_iter") == state["iter_num"]


def finished_line(state: dict, run_dir: Path) -> str:
    """What resuming a run with nothing left to do says: that it is left as it is, and how to train it on."""
    best = state.get("best_val_loss")
    again = launch_command(f"nanogpt.train resume={run_dir} max_iters=N", context_from_environment())
    return (f"{run_dir} has finished: it trained to iteration {state['iter_num']} and evaluated there (best "
            f"val loss {best:.4f}); nothing to do, so nothing was changed. To train it further, raise "
            f"max_iters: {again} (N above {state['iter_num']})")


class ResumableRunDir(ClaimRunDir):
    """train's claim on its run directory (conf/train.yaml): resume= and auto_resume=true may continue a run.

    Before Hydra writes anything there, the resume is checked: its last.pt is
    read (and kept for the task), the new config must keep what the run means
    and its job size, and a run with nothing left to do ends here, as it is.
    """

    resumable = True

    def check_resume(self, config: DictConfig, run_dir: Path) -> None:
        task_config = copy.deepcopy(config)
        with read_write(task_config), open_dict(task_config):
            del task_config["hydra"]  # what the task will be given
        train = to_dataclass(task_config, TrainConfig)
        path = resume_path(train.resume, train.auto_resume, run_dir)
        if path is None:
            return
        saved = checked_saved_run(path, recorded_config(task_config, train))
        if nothing_left(saved.state, train.max_iters):
            _read.pop(saved.path, None)
            raise NothingToDo(finished_line(saved.state, run_dir))


def resume_arguments(argv: list[str]) -> list[str]:
    """Rewrite the command line of ``train resume=X [overrides]`` before Hydra sees it.

    The run's own overrides (from its checkpoint) come first, the new ones replace
    any for the same key, and hydra.run.dir points at the run's directory, so the
    run continues where it lives. An incompatible change is refused here, before
    Hydra writes anything into the run directory. Other command lines pass as they are.
    """
    if not any(a.startswith("resume=") for a in argv):
        return argv
    flags = [a for a in argv if a.startswith("-")]
    if any(f in ("-m", "--multirun") for f in flags):
        raise ConfigError("resume= continues one run; it cannot be combined with --multirun")
    if flags:  # --help, --cfg job, ...: nothing is trained, so the line passes as it is
        return argv
    given = parse_overrides(argv)
    target = next((o.value() for o in given if o.key_or_group == "resume"), None)
    if target is None:  # resume=null
        return argv
    path = resume_checkpoint_path(str(target))
    saved = saved_run(path)
    run_dir = path.parent
    # Naming the run's own directory is harmless (torchrun's other ranks are handed rank 0's).
    if any(o.key_or_group.startswith("hydra.run") and not is_dir_override(o, run_dir) for o in given):
        raise ConfigError("resume= continues in the run's own directory; drop hydra.run.dir")
    given = [o for o in given if not o.key_or_group.startswith("hydra.run")]

    def key(override) -> str:
        return f"{override.key_or_group}@{override.package}"

    started = parse_overrides(saved.overrides)
    new_keys = {key(o) for o in given}
    kept = [o.input_line for o in started if key(o) not in new_keys and o.key_or_group != "resume"]
    # The source as the run recorded it (absolute), so a relative path given then still finds it from here.
    source = saved.config.get("dataset", {}).get("source")
    given_source = any(o.key_or_group == "dataset.source" for o in given)
    if source is not None and any(o.key_or_group == "dataset.source" for o in started) and not given_source:
        kept = [line for line in kept if not line.startswith("dataset.source=")]
        kept.append(f"dataset.source={quote(str(source))}")
    overrides = kept + [o.input_line for o in given if o.key_or_group != "resume"]
    overrides.append(f"resume={quote(str(path))}")

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = compose(config_name="train", overrides=overrides)
    config = to_dataclass(composed, TrainConfig)  # wrong keys or types fail now, not in the run directory
    check_resume_compatible(saved.config, recorded_config(composed, config))
    return overrides + [f"hydra.run.dir={quote(str(run_dir))}"]


def is_dir_override(override, run_dir: Path) -> bool:
    """True for ``hydra.run.dir=`` naming run_dir itself."""
    return override.key_or_group == "hydra.run.dir" and Path(str(override.value())).resolve() == run_dir
