"""A prepared dataset as training reads it: token files, memory-mapped, and random batches of windows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanogpt.dataset.sft import ExampleWindows
from nanogpt.errors import DataError


@dataclass
class PreparedData:
    """Where a prepared dataset lives, and its metadata."""

    directory: Path
    meta: dict
    opened: dict = field(default_factory=dict, repr=False)  # split -> tokens mapped while the cache is locked

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids the model must cover."""
        return self.meta["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        """The integer type of the token files (caches from before uint32 existed are uint16)."""
        return np.dtype(self.meta.get("dtype", "uint16"))

    def split_path(self, split: str) -> Path:
        """Path of the token file for 'train' or 'val'."""
        return self.directory / f"{split}.bin"

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (nothing is read until used)."""
        if split in self.opened:
            return self.opened[split]
        if self.meta.get(f"{split}_tokens", 1) == 0:
            return np.zeros(0, dtype=self.dtype)  # a memmap of an empty file is an error
        return np.memmap(self.split_path(split), dtype=self.dtype, mode="r")


class BatchSampler:
    """Random training windows from a prepared dataset's token files.

    Each batch row is block_size + 1 consecutive tokens: the model reads the
    first block_size and predicts the last block_size. The sampler draws from
    its own seeded generator, so its position can be saved and restored.
    Evaluation batches come from a second generator, so how often and how long
    a run evaluates does not change which batches it trains on.
    rank and world_size give a process of a distributed job its share of each batch.
    Instruction data (dataset=sft) is served a whole example per row instead,
    with targets only on the answers (ExampleWindows, nanogpt/dataset/sft.py).
    """

    def __init__(
        self,
        data: PreparedData,
        block_size: int,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.block_size = block_size
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.device = device
        self.splits = {split: data.tokens(split) for split in ("train", "val")}
        self.examples = ExampleWindows(data, block_size) if ExampleWindows.holds(data) else None
        for split, tokens in self.splits.items():
            if len(tokens) <= block_size and self.examples is None:
                raise DataError(
                    f"the {split} split of {data.meta['name']} has {len(tokens)} tokens, too few "
                    f"for model.block_size={block_size}; use a smaller block_size or more text"
                )
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_generator = torch.Generator().manual_seed(seed + 1)
        self.offsets = np.arange(block_size + 1)

    def state_dict(self) -> dict:
        """Where both generators stand (under the names checkpoints have always used)."""
        return {"sampler_rng": self.generator.get_state(),
                "eval_sampler_rng": self.eval_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["sampler_rng"])
        self.eval_generator.set_state(state["eval_sampler_rng"])

    def get_batch(self, split: str, evaluation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (inputs, targets), each (batch_size, block_size) int64 on the device.

        evaluation=True draws from the evaluation generator instead of the training one.
        """
        tokens = self.splits[split]
        # In a job of world_size processes, each draws the whole job's batch from
        # the same generator and keeps its own rows: different data on every
        # process, and together exactly the batches one process would draw.
        choices = self.examples.count(split) if self.examples is not None else len(tokens) - self.block_size
        starts = torch.randint(
            choices, (self.world_size * self.batch_size,),
            generator=self.eval_generator if evaluation else self.generator,
        ).numpy()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if self.examples is not None:  # starts are examples
            return tuple(self.to_device(torch.from_numpy(a)) for a in self.examples.batch(split, starts))
        windows = self.to_device(torch.from_numpy(tokens[starts[:, None] + self.offsets].astype(np.int64)))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with the GPU's work.
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)
