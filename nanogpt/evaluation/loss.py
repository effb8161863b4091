"""The exact loss of a model on a split: every token scored once, in non-overlapping windows.

Training reports a loss estimated on a few random batches, which is noisy
(1.886 estimated, 1.898 exact for the same model in one measurement). Here the
split's N tokens are cut into (N - 1) // block_size non-overlapping windows;
window i reads tokens[i*B : i*B + B] and predicts tokens[i*B + 1 : i*B + B + 1].
The result is the mean cross-entropy over all of those predictions, in nats,
summed in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from nanogpt.errors import DataError
from nanogpt.model import GPT
from nanogpt.runtime.device import autocast


@torch.no_grad()
def exact_loss(model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device,
               dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[float, int]:
    """(mean cross-entropy in nats, number of windows) over all non-overlapping block_size windows."""
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
    return total / (windows * block), windows
