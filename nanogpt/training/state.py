"""What a training run has reached, and so what a last.pt holds: the one place that says so.

TrainingState.state_dict() / load_state_dict() is the pair that every
checkpoint, every resume and the rewind of an abandoned step go through: the
weights, the optimizer, the position, the batch fetched ahead and every random
generator (Python, NumPy, torch CPU and CUDA, the batch sampler's own), with
what the run is, how it was started and the wall time it has taken so far
(which a resumed run's summary goes on adding to). The Trainer (trainer.py) is a
TrainingState with the loop that moves it on. SavedRun reads a last.pt back,
with the few facts a command line needs before any Trainer exists.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanogpt.errors import CheckpointError
from nanogpt.runtime import distributed, sharding
from nanogpt.runtime.process import Runtime
from nanogpt.weights import lora, sharded
from nanogpt.weights.checkpoint import LAST, load_checkpoint


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


def restore_rng_state(state: dict | None) -> None:
    """Put every random generator back where capture_rng_state() found it (None: leave them as they are)."""
    if state is None:
        return
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in states])


@dataclass
class SavedRun:
    """A last.pt, read once: the Trainer's state_dict() to go on from, and what it says of its run."""

    path: Path
    state: dict

    @classmethod
    def read(cls, path: Path) -> SavedRun:
        """Load a checkpoint (never executing code) that holds a full training state.

        Its tensors are mapped from the file, read as they are used: an FSDP job's
        processes each read their rows of a whole one (sharded.load_into).
        """
        state = load_checkpoint(path, mmap=True)
        if "training" not in state or "optimizer" not in state:
            raise CheckpointError(f"{path} holds weights but no training state (optimizer, random "
                                  f"generators); resume from the run's {LAST}")
        return cls(Path(path), state)

    @property
    def overrides(self) -> list[str]:
        """The command line the run was started with."""
        return list(self.state["training"].get("overrides", []))

    @property
    def config(self) -> dict:
        """The run's resolved config, as it recorded it."""
        return self.state.get("config") or {}

    @property
    def iter_num(self) -> int:
        return self.state["iter_num"]

    @property
    def sharded(self) -> bool:
        """True for an FSDP job's checkpoint: its weights and optimizer state are in a folder of shards."""
        return "shards" in self.state

    @property
    def world_size(self) -> int:
        """How many processes trained it (their random states are saved one per rank)."""
        return self.state["training"].get("world_size", 1)


class TrainingState:
    """Where a run stands: what state_dict() saves and load_state_dict() puts back.

    The Trainer sets these parts up before anything here is called.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: object  # a BatchSampler: its two random generators
    runtime: Runtime
    about: dict  # what the run is: model shape, tokenizer, config, data, chat template
    overrides: list[str]  # the command line the run was started with
    tracker_run_id: str | None  # the logger's run, which a resumed run goes on with
    iter_num: int
    best_val_loss: float
    last_eval_iter: int | None
    batch: tuple[torch.Tensor, torch.Tensor] | None  # the next training batch, fetched ahead
    records: object  # the run's RunRecords (tracking/records.py): its age is this piece's wall time
    earlier_wall_time_s: float = 0.0  # a resumed run's, up to its checkpoint: its earlier pieces together

    def state_dict(self, weights: bool = True) -> dict:
        """Training state as tensors and plain data: what a last.pt holds, on rank 0.

        Every process calls it: each one's random state and next batch go into
        rank 0's (under "ranks"). weights=False gives this process's position
        alone (no model, optimizer or run description), which a step changes
        before its very end: what rewinding an abandoned step needs.
        """
        training = {"scaler": self.scaler.state_dict(), "last_eval_iter": self.last_eval_iter,
                    "rng": capture_rng_state(), "batch": self.batch, **self.sampler.state_dict()}
        state = {"iter_num": self.iter_num, "best_val_loss": self.best_val_loss,
                 "training": training}
        if not weights:
            return state
        training["batch"] = None if self.batch is None else [t.cpu() for t in self.batch]
        dist = self.runtime.dist
        ranks = distributed.gather_to_main({k: training[k] for k in ("rng", "batch")}, dist)
        training.update(world_size=dist.world_size, overrides=list(self.overrides),
                        tracker_run_id=self.tracker_run_id, ranks=ranks if dist.enabled else None,
                        wall_time_s=self.wall_time_s())
        weights = (sharding.state_of(self.model, self.optimizer) if self.runtime.sharded else
                   {"model": lora.trainable_weights(self.model), "optimizer": self.optimizer.state_dict()})
        return {**self.about, **state, **weights, **lora.record(self.model)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from state (a state_dict(), or a last.pt) exactly where it was."""
        training, context = state["training"], self.runtime.dist
        if "optimizer" in state:
            if self.runtime.sharded or "shards" in state:  # at any job size (distributed.own_share)
                sharded.load_into(self.model, self.optimizer, state)
            else:
                distributed.check_world_size(training.get("world_size", 1), context.world_size)
                lora.load_trainable_weights(self.model, state["model"], state.get("lora"))
                self.optimizer.load_state_dict(state["optimizer"])
            self.tracker_run_id = self.tracker_run_id or training.get("tracker_run_id")
            self.earlier_wall_time_s = training.get("wall_time_s", 0.0)  # older checkpoints lack it
        self.scaler.load_state_dict(training["scaler"])
        self.iter_num, self.best_val_loss = state["iter_num"], state["best_val_loss"]
        self.last_eval_iter = training["last_eval_iter"]
        self.sampler.load_state_dict(training)
        own = distributed.own_share(training, context) or {"batch": None, "rng": None}  # None: draw afresh
        batch = own["batch"]
        self.batch = None if batch is None else tuple(t.to(self.runtime.device) for t in batch)
        restore_rng_state(own["rng"])

    def wall_time_s(self) -> float:
        """Seconds the run has taken: this piece, and a resumed run's earlier ones up to its checkpoint."""
        return round(self.earlier_wall_time_s + self.records.age_s(), 3)

    def rewind_point(self) -> Callable[[], None]:
        """What puts the run back where it stands now, should a stop abandon what begins next.

        Until the optimizer's update, a step changes only the batch fetched ahead, the
        random generators and the gradients, and an evaluation its sampler's generator
        and the model's mode: put back, the state is the last completed step's.
        """
        saved = self.state_dict(weights=False)

        def rewind() -> None:
            self.load_state_dict(saved)
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train()

        return rewind
