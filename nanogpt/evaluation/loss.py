"""A model's loss on a split: estimated from random batches during training, or exact (``task=loss``).

Training reports estimate_loss(), the mean over a few random batches, which is
noisy (1.886 estimated, 1.898 exact for the same model in one measurement).
exact_loss() scores every token once: the split's N tokens are cut into
(N - 1) // block_size non-overlapping windows; window i reads tokens[i*B : i*B + B]
and predicts tokens[i*B + 1 : i*B + B + 1]. The result is the mean cross-entropy
over all of those predictions, in nats, summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from nanogpt.dataset.batches import BatchSampler, ExampleWindows
from nanogpt.errors import DataError
from nanogpt.evaluation.tasks import Subject, Task, task_name
from nanogpt.model import GPT
from nanogpt.runtime.device import autocast


@torch.no_grad()
def exact_loss(model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device,
               dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[float, int]:
    """(mean cross-entropy in nats, number of windows) over all non-overlapping block_size windows."""
    total, windows = summed_loss(model, tokens, batch_size, device, dtype, progress)
    return total / (windows * model.config.block_size), windows


@torch.no_grad()
def summed_loss(model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[float, int]:
    """(summed cross-entropy in nats, number of windows) over exact_loss's windows."""
    block = model.config.block_size
    windows = (len(tokens) - 1) // block
    if windows < 1:
        raise DataError(f"the split has {len(tokens)} tokens; scoring needs block_size + 1 = {block + 1}")
    total = 0.0
    bar = tqdm(total=windows, desc="eval", unit="window", disable=None if progress else True)
    for first in range(0, windows, batch_size):
        count = min(batch_size, windows - first)
        # count windows and the one token after them: inputs and targets are the same ids shifted by one.
        ids = tokens[first * block: (first + count) * block + 1].astype(np.int64)
        chunk = torch.from_numpy(ids).to(device)
        inputs, targets = chunk[:-1].view(count, block), chunk[1:].view(count, block)
        with autocast(device, dtype):
            logits, _ = model(inputs, targets)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        bar.update(count)
    bar.close()
    return total, windows


@torch.no_grad()
def exact_answer_loss(model: GPT, examples: ExampleWindows, split: str, batch_size: int, device: torch.device,
                      dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[float, int]:
    """(mean cross-entropy in nats, answer tokens) over every example of instruction data, each scored alone.

    Only the answers' tokens (and their end-of-text) are scored, as training learns them (dataset=sft).
    """
    total, count, examples_in_split = 0.0, 0, examples.count(split)
    for first in tqdm(range(0, examples_in_split, batch_size), desc="eval", unit="batch",
                      disable=None if progress else True):
        picks = np.arange(first, min(first + batch_size, examples_in_split))
        inputs, targets = (torch.from_numpy(a).to(device) for a in examples.batch(split, picks))
        with autocast(device, dtype):
            logits, _ = model(inputs, targets)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                                 reduction="sum").item()
        count += int((targets != -1).sum())
    return total / count, count


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, sampler: BatchSampler, eval_iters: int, ctx,
                  batch_done=lambda done, total: None) -> dict:
    """Mean loss over eval_iters random batches of each split, batch_done(n, of) after each."""
    model.eval()
    losses = {}
    for s, split in enumerate(("train", "val")):
        total = torch.zeros((), device=sampler.device)
        for i in range(eval_iters):
            x, y = sampler.get_batch(split, evaluation=True)
            with ctx:
                _, loss = model(x, y)
            total += loss.float()
            batch_done(s * eval_iters + i + 1, 2 * eval_iters)
        losses[split] = (total / eval_iters).item()
    model.train()
    return losses


@dataclass
class LossOptions:
    """task=loss has no options of its own: split=, dataset= and batch_size= are the eval command's."""

    name: str = task_name("loss")


class LossTask(Task):
    """The exact mean cross-entropy over every window of the split (the default task)."""

    name = "loss"
    Options = LossOptions

    def run(self, subject: Subject) -> dict:
        split = subject.split()
        if split.data is not None and ExampleWindows.holds(split.data):  # instruction data: answers only
            examples = ExampleWindows(split.data, subject.model.config.block_size)
            loss, tokens = exact_answer_loss(subject.model, examples, subject.split_name, subject.batch_size,
                                             subject.device, subject.dtype, subject.progress)
            windows = examples.count(subject.split_name)
        else:
            loss, windows = exact_loss(subject.model, split.tokens, subject.batch_size, subject.device,
                                       subject.dtype, subject.progress)
            tokens = windows * subject.model.config.block_size
        result = {"tokens_file": str(split.where), "split": subject.split_name, "loss": loss,
                  "perplexity": math.exp(loss), "tokens": tokens, "windows": windows}
        if subject.tokenizer.kind == "char":
            result["bits_per_char"] = loss / math.log(2)  # one token is one character
        return result

    def describe(self, result: dict) -> str:
        return (f"{result['split']} loss {result['loss']:.4f} (perplexity {result['perplexity']:.3f}) over "
                f"{result['windows']:,} windows, {result['tokens']:,} tokens of {result['tokens_file']}")

    def metrics(self, result: dict) -> dict[str, float]:
        return {"exact_loss": result["loss"]}
