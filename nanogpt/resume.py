"""Resuming a run exactly: where from, what may change, and the random state to restore.

A run's last.pt carries, besides the weights and the optimizer, everything that
decides what the run does next: the grad scaler, every random generator (Python,
NumPy, torch on the CPU and on each GPU, and the batch sampler's own), the batch
already fetched for the next step, the iteration of the last evaluation, and the
command-line overrides the run was started with. All of it is tensors and plain
data, so the checkpoint still loads with torch.load(weights_only=True).

``python -m nanogpt.train resume=RUN_DIR_OR_CKPT [safe overrides]`` re-composes
the run's own overrides, lets the new ones replace theirs, refuses any change to
what the run means (model, dataset, optimizer, seed, batch) and trains on in the
same run directory. ``auto_resume=true`` does the same for a run whose (fixed)
run directory already holds a last.pt, as a preempted cluster job restarts.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from nanogpt.checkpoint import LAST, load_checkpoint, remove_stale_temporaries
from nanogpt.cli import to_dataclass
from nanogpt.config import CONFIG_DIR, TrainConfig
from nanogpt.distributed import context_from_environment
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.tracking import Resumed

log = logging.getLogger("nanogpt.resume")

# Config keys (and groups) that define what a run is; a resumed run must keep them.
MEANING_KEYS = ("model", "dataset", "optimizer", "seed", "batch_size", "gradient_accumulation_steps")
SAFE_EXAMPLES = "max_iters, eval_interval, eval_iters, log_interval, sample_tokens, device, logger, data_root"


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


def load_resumable(path: Path) -> dict:
    """Load a checkpoint (never executing code) that holds a full training state."""
    state = load_checkpoint(path)
    if "training" not in state or "optimizer" not in state:
        raise CheckpointError(
            f"{path} holds weights but no training state (optimizer, random generators); "
            f"resume from the run's {LAST}"
        )
    return state


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as {dotted.key: value}."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_resume_compatible(saved: dict, new: dict) -> None:
    """Raise ConfigError if new changes a key that defines the saved run."""
    old_flat, new_flat = flatten(saved), flatten(new)
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if key.split(".")[0] not in MEANING_KEYS:
            continue
        old, value = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if old != value:
            raise ConfigError(
                f"resume: {key}={value} would change the run, which has {key}={old}; a resumed run "
                f"keeps its model, dataset, optimizer, seed and batch (safe to change: {SAFE_EXAMPLES}); "
                "start a new run to change it"
            )


def checkpoint_to_resume(resume: str | None, auto_resume: bool, run_dir: Path, config: dict) -> dict | None:
    """The training state to continue from, checked against config; None to start afresh."""
    if resume:
        path = resume_checkpoint_path(resume)
    elif auto_resume and (run_dir / LAST).is_file():
        path = run_dir / LAST
    else:
        return None
    state = load_resumable(path)
    check_resume_compatible(state.get("config", {}), config)
    check_world_size(state, context_from_environment().world_size)
    log.info("resuming %s from iteration %d (%s)", run_dir, state["iter_num"], path)
    return state


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
    parser = OverridesParser.create()
    given = parser.parse_overrides(argv)
    target = next((o.value() for o in given if o.key_or_group == "resume"), None)
    if target is None:  # resume=null
        return argv
    path = resume_checkpoint_path(str(target))
    state = load_resumable(path)
    run_dir = path.parent
    # Naming the run's own directory is harmless (torchrun's other ranks are handed rank 0's).
    if any(o.key_or_group.startswith("hydra.run") and not is_dir_override(o, run_dir) for o in given):
        raise ConfigError("resume= continues in the run's own directory; drop hydra.run.dir")
    given = [o for o in given if not o.key_or_group.startswith("hydra.run")]

    def key(override) -> str:
        return f"{override.key_or_group}@{override.package}"

    saved = parser.parse_overrides(list(state["training"].get("overrides", [])))
    new_keys = {key(o) for o in given}
    kept = [o.input_line for o in saved if key(o) not in new_keys and o.key_or_group != "resume"]
    overrides = kept + [o.input_line for o in given if o.key_or_group != "resume"]
    overrides.append(f"resume={quote(str(path))}")

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = compose(config_name="train", overrides=overrides)
    check_resume_compatible(state.get("config", {}), OmegaConf.to_container(composed, resolve=True))
    to_dataclass(composed, TrainConfig)  # wrong keys or types fail now, not in the run directory
    return overrides + [f"hydra.run.dir={quote(str(run_dir))}"]


def is_dir_override(override, run_dir: Path) -> bool:
    """True for ``hydra.run.dir=`` naming run_dir itself."""
    return override.key_or_group == "hydra.run.dir" and Path(str(override.value())).resolve() == run_dir


def quote(value: str) -> str:
    """A string as a single-quoted Hydra override value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------- the state itself


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Every random generator's state, as tensors and plain data."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put every random generator back where capture_rng_state() found it."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in states])


def rewind_point(trainer) -> Callable[[], None]:
    """What puts trainer back where it stands now, should a stop abandon the step or evaluation it begins.

    Until the optimizer updates the weights, a step changes only the batch fetched
    ahead, torch's random generators (dropout, the samplers) and the gradients, and
    an evaluation only its sampler's generator and the model's train/eval mode; put
    back, the state is that of the last completed step, which is what a stop saves.
    Called before every step of a single process, so it copies only those few
    kilobytes (Python's and NumPy's generators, untouched by a step, cost 10x more).
    """
    batch, sampler = trainer.batch, trainer.sampler
    rng = torch.get_rng_state()
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if on_gpu else None
    generators = sampler.generator.get_state(), sampler.eval_generator.get_state()

    def rewind() -> None:
        trainer.batch = batch
        torch.set_rng_state(rng)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        sampler.generator.set_state(generators[0])
        sampler.eval_generator.set_state(generators[1])
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.model.train()

    return rewind


def check_world_size(state: dict, world_size: int) -> None:
    """Refuse to resume a run on a different number of processes than it was saved with.

    Each process's random state and its share of the next batch are saved per
    rank; with another number of ranks they would not add up to the same run.
    """
    saved = state["training"].get("world_size", 1)
    if saved != world_size:
        launch = "python -m" if saved == 1 else f"torchrun --nproc_per_node={saved} -m"
        raise ConfigError(
            f"resume: the run was saved by {saved} process(es) and this job has {world_size}; resume it "
            f"with as many ({launch} nanogpt.train resume=...), or start a new run from its weights "
            "(model.init_from=RUN_DIR)"
        )


def rank_state(batch: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """What differs between a job's ranks and resuming needs: random state, the batch fetched ahead."""
    return {"rng": capture_rng_state(), "batch": [t.cpu() for t in batch] if batch is not None else None}


def command(run_dir: Path, context) -> str:
    """The command that continues run_dir, launched as this job was (one process, or torchrun)."""
    if not context.enabled:
        return f"python -m nanogpt.train resume={run_dir}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    if local == context.world_size:
        return f"torchrun --standalone --nproc_per_node={local} -m nanogpt.train resume={run_dir}"
    return f"torchrun <this job's options, on every node> -m nanogpt.train resume={run_dir}"


def progress(state: dict | None) -> Resumed | None:
    """Where a checkpoint left off (None for a fresh run), for the run's records."""
    if state is None:
        return None
    return Resumed(state["iter_num"], state["training"]["last_eval_iter"])


def training_state(trainer, ranks: list[dict]) -> dict:
    """What resuming needs beyond weights and optimizer: RNGs, next batch, progress markers.

    ranks holds every rank's random state and next batch (gather_to_main); rank 0's
    also sits at the top level, where a single process's always has.
    """
    return {
        "scaler": trainer.scaler.state_dict(), **ranks[0], "world_size": len(ranks),
        "ranks": ranks if len(ranks) > 1 else None,
        "sampler_rng": trainer.sampler.generator.get_state(),
        "eval_sampler_rng": trainer.sampler.eval_generator.get_state(),
        "last_eval_iter": trainer.last_eval_iter, "overrides": trainer.overrides,
        "tracker_run_id": trainer.records.run_id,
    }


def restore_training_state(trainer, state: dict) -> None:
    """Continue from a last.pt exactly where its run was when saved (each rank from its own part)."""
    training, context = state["training"], trainer.runtime.dist
    check_world_size(state, context.world_size)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(training["scaler"])
    trainer.iter_num = trainer.last_saved_iter = state["iter_num"]
    trainer.best_val_loss, trainer.last_eval_iter = state["best_val_loss"], training["last_eval_iter"]
    trainer.sampler.generator.set_state(training["sampler_rng"])
    trainer.sampler.eval_generator.set_state(training["eval_sampler_rng"])
    own = training["ranks"][context.rank] if context.world_size > 1 else training
    if own["batch"] is not None:
        trainer.batch = tuple(t.to(trainer.runtime.device) for t in own["batch"])
    restore_rng_state(own["rng"])
    remove_stale_temporaries(trainer.run_dir)  # left by a process killed while saving
