"""A prepared dataset as training reads it: token files, memory-mapped, and random batches of windows.

Instruction data (dataset=sft, nanogpt/dataset/sft.py) is served a whole example
per row instead (ExampleWindows), with targets only on the answers; preference
pairs (dataset=preference) as two rows a pair, the chosen answers' first; prompts
(dataset=prompts) as the indices of the prompts drawn, whose answers the
objective samples (PromptSet; nanogpt/training/objectives.py).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanogpt.errors import DataError
from nanogpt.text.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger("nanogpt.data")

WIDTH_MULTIPLE = 64  # instruction batches' widths are rounded up to this (capped at block_size)


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

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer that made the tokens (meta.json keeps its description)."""
        return load_tokenizer(self.meta["tokenizer"])

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
    with targets only on the answers (ExampleWindows below).
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
        self.pairs = data.meta.get("pairs")  # dataset=preference: pairs per split (two examples each)
        self.prompts = PromptSet(data) if PromptSet.holds(data) else None
        for split, tokens in self.splits.items():
            if len(tokens) <= block_size and self.examples is None and self.prompts is None:
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

    def get_batch(self, split: str, evaluation: bool = False) -> tuple[torch.Tensor, ...]:
        """Return (inputs, targets), each (batch_size, block_size) int64 on the device.

        evaluation=True draws from the evaluation generator instead of the training one.
        Pairs give 2 * batch_size rows (the chosen answers, then the rejected); prompts
        give (indices,), the batch_size prompts drawn.
        """
        tokens = self.splits[split]
        # In a job of world_size processes, each draws the whole job's batch from
        # the same generator and keeps its own rows: different data on every
        # process, and together exactly the batches one process would draw.
        if self.pairs is not None:
            choices = self.pairs[split]
        elif self.prompts is not None:
            choices = self.prompts.count(split)
        elif self.examples is not None:
            choices = self.examples.count(split)
        else:
            choices = len(tokens) - self.block_size
        starts = torch.randint(
            choices, (self.world_size * self.batch_size,),
            generator=self.eval_generator if evaluation else self.generator,
        ).numpy()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if self.prompts is not None:
            return (self.to_device(torch.from_numpy(starts.astype(np.int64))),)
        if self.pairs is not None:  # pair i is examples 2i (chosen) and 2i + 1 (rejected)
            starts = np.concatenate([2 * starts, 2 * starts + 1])
        if self.examples is not None:  # starts are examples
            return tuple(self.to_device(torch.from_numpy(a)) for a in self.examples.batch(split, starts))
        windows = self.to_device(torch.from_numpy(tokens[starts[:, None] + self.offsets].astype(np.int64)))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with the GPU's work.
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)


class ExampleWindows:
    """Batches of whole examples from prepared sft data: inputs, and targets with the prompts masked (-1)."""

    def __init__(self, data: PreparedData, block_size: int):
        self.block_size = block_size
        self.tokens = {split: data.tokens(split) for split in ("train", "val")}
        self.learned = {split: np.memmap(data.directory / f"{split}.mask.bin", dtype=np.uint8, mode="r")
                        for split in ("train", "val")}
        self.offsets = {split: np.fromfile(data.directory / f"{split}.offsets.bin", dtype=np.int64)
                        for split in ("train", "val")}
        for split in ("train", "val"):
            log_cut_examples(split, self.offsets[split], self.learned[split], block_size)

    @staticmethod
    def holds(data: PreparedData) -> bool:
        """True for a dataset prepared from instruction data."""
        return "examples" in data.meta

    def count(self, split: str) -> int:
        return len(self.offsets[split]) - 1

    def batch(self, split: str, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) as int64 arrays (rows, width) for the examples picked; padding is masked."""
        offsets, tokens, learned = self.offsets[split], self.tokens[split], self.learned[split]
        ends = offsets[picks + 1]
        starts = np.maximum(offsets[picks], ends - (self.block_size + 1))
        longest = int((ends - starts).max()) - 1
        width = min(self.block_size, -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
        inputs = np.zeros((len(picks), width), dtype=np.int64)
        targets = np.full((len(picks), width), -1, dtype=np.int64)
        for row, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            ids = tokens[start:end].astype(np.int64)
            n = len(ids) - 1
            inputs[row, :n] = ids[:-1]
            targets[row, :n] = np.where(learned[start + 1:end] == 1, ids[1:], -1)
        return inputs, targets


def log_cut_examples(split: str, offsets: np.ndarray, learned: np.ndarray, block_size: int) -> None:
    """Say how many examples are too long for the block, and what of them is cut: prompt, or answer too.

    A row holds an example's last block_size + 1 tokens, so a longer one loses
    its beginning: usually part of the prompt, but where what is learned (an
    answer, or an earlier turn's) reaches back further than that, part of it.
    """
    lengths = np.diff(offsets)
    too_long = np.flatnonzero(lengths > block_size + 1)
    if not len(too_long):
        return
    into_answers = sum(bool(learned[offsets[i]:offsets[i + 1] - (block_size + 1)].any()) for i in too_long)
    prompts_only = len(too_long) - into_answers
    log.info("sft: %d of %d %s examples are longer than block_size + 1 = %d tokens and are cut from the "
             "left: %d lose only part of their prompt, %d part of an answer too (what they learn is longer "
             "than the block)", len(too_long), len(lengths), split, block_size + 1, prompts_only,
             into_answers)


class PromptSet:
    """Prepared prompts (dataset=prompts): each one's ids, and its example's fields for the reward."""

    def __init__(self, data: PreparedData):
        self.tokens = {split: data.tokens(split) for split in ("train", "val")}
        self.offsets = {split: np.fromfile(data.directory / f"{split}.offsets.bin", dtype=np.int64)
                        for split in ("train", "val")}
        self.examples = {split: [json.loads(line) for line in
                                 (data.directory / f"{split}.examples.jsonl").read_text().splitlines()]
                         for split in ("train", "val")}

    @staticmethod
    def holds(data: PreparedData) -> bool:
        """True for a dataset prepared from prompts."""
        return "prompts" in data.meta

    def count(self, split: str) -> int:
        return len(self.offsets[split]) - 1

    def ids(self, split: str, index: int) -> list[int]:
        """The token ids of a prompt, ending where the answer begins."""
        start, end = self.offsets[split][index], self.offsets[split][index + 1]
        return self.tokens[split][start:end].astype(np.int64).tolist()

    def example(self, split: str, index: int) -> tuple[dict, str]:
        """(the example's fields, where it came from: file:line)."""
        found = self.examples[split][index]
        return found["example"], found["where"]
