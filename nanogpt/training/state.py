"""The random generators' state, and a last.pt read back: what the Trainer's state_dict() saves around it.

What a run's state holds (weights, optimizer, position, batches, every random
generator) is the Trainer's to say: Trainer.state_dict() in trainer.py.
SavedRun is that state read back, with the few facts a command line needs
before any Trainer exists (how the run was started, its config, its job size).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanogpt.errors import CheckpointError
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


@dataclass
class SavedRun:
    """A last.pt, read once: the Trainer's state_dict() to go on from, and what it says of its run."""

    path: Path
    state: dict

    @classmethod
    def read(cls, path: Path) -> SavedRun:
        """Load a checkpoint (never executing code) that holds a full training state."""
        state = load_checkpoint(path)
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
    def world_size(self) -> int:
        """How many processes trained it (their random states are saved one per rank)."""
        return self.state["training"].get("world_size", 1)
