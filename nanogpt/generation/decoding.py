"""Generating text token by token: the KV cache and the decoding loop behind GPT.generate and GPT.stream.

Without a cache, every new token would re-run the model over the whole context.
A KVCache per attention layer keeps the keys and values already computed, so
the prompt runs once and each new token then costs one position.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nanogpt.generation.sampling import sample_next_token


class KVCache:
    """Keys and values already computed for one attention layer during generation.

    Generating one token at a time would otherwise recompute attention inputs for
    the whole context at every step. The cache holds them for positions
    0..length-1 so each new step only computes its own key and value.
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_size: int, like: torch.Tensor):
        shape = (batch_size, n_head, max_len, head_size)
        self.keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.values = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys and values after the cached ones; return everything cached so far."""
        start, end = self.length, self.length + k.size(2)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


@torch.no_grad()
def decode(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
           generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield each new token of model (a GPT), shape (batch, 1), as soon as it is sampled, so text shows live.

    With use_cache, the prompt is run once and then each new token costs one
    position. Positions stop at block_size, so when the context fills, the
    cache is rebuilt from the newest half of the window: every token still
    sees at least block_size // 2 tokens of context, at correct positions.
    Up to block_size tokens the output equals use_cache=False, which re-runs
    the last block_size tokens at every step.
    """
    block_size = model.config.block_size
    caches = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])
        elif caches is None or caches[0].length == block_size:
            # Fill a fresh cache from the (newest part of the) context.
            keep = block_size if caches is None else max(1, block_size // 2)
            caches = model.new_caches(idx.size(0))
            logits, _ = model(idx[:, -keep:], caches=caches)
        else:
            logits, _ = model(idx[:, -1:], caches=caches)
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
        idx = torch.cat((idx, next_token), dim=1)
        yield next_token
