"""The decoding loop every way of generating text shares: a Decoder over a model's KV cache.

GPT.generate and GPT.stream (nanogpt/model.py), nanogpt.load's models (and so
``nanogpt.sample`` and ``nanogpt.chat``), the server's batches (nanogpt/generation/
batching.py), evaluation's generation tasks and the benchmark all take their
next-token logits from Decoder.next_logits(), so the rule of what each token sees
is written once, here:

* a sequence starts with its newest block_size tokens run into its row of the
  cache at once (a fill: the prompt);
* then each new token costs one position (a step);
* a full row is filled again from the newest half window, so every token sees at
  least block_size // 2 tokens of context, at positions the model was trained on.

Rows are independent: each holds its own sequence, of its own length, so a batch
can hold a server's requests that come and go. A compiled step (torch.compile
over a static cache) needs shapes that never change, so over a static cache
every row steps, whether it has a token to take or not. model.py imports this
module; it imports nothing of the package, and knows the model and its
KVCache only by what it calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class Decoder:
    """Sequences continued a token at a time, each in its own row of a model's KVCache."""

    def __init__(self, model: nn.Module, cache, step: Callable[..., tuple] | None = None):
        """model: a GPT; cache: its KVCache (model.new_cache()); step: what computes one token's
        logits, the model itself or a compiled copy of it over a static cache.
        """
        self.model, self.cache, self.step = model, cache, model if step is None else step
        self.block = model.config.block_size
        self.held = [0] * len(cache.lengths)  # tokens of row r's sequence in the cache; 0: to fill

    def fills(self, row: int) -> bool:
        """True when row is filled before its next token: it is new, or full."""
        return self.held[row] in (0, self.block)

    @torch.no_grad()
    def next_logits(self, sequences: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """The logits (rows, vocab) of the token after each sequence; cache row r holds sequences[r].

        sequences: a (rows, T) tensor of ids, or a list of lists of ids. The rows that
        step come first, then those that fill (a caller that schedules rows of its own
        keeps them in that order); rows that fill from as many tokens fill together,
        in one batch.
        """
        rows = len(sequences)
        start = next((r for r in range(rows) if self.fills(r)), rows)
        logits = [self.step_rows(self.newest(sequences, 0, start, 1))] if start else []
        while start < rows:
            n = self.window(start, sequences)
            stop = next((r for r in range(start, rows) if self.window(r, sequences) != n), rows)
            part = self.cache.rows(start, stop)
            part.lengths.zero_()
            logits.append(self.model(self.newest(sequences, start, stop, n), cache=part)[0][:, -1])
            self.held[start:stop] = [n] * (stop - start)
            start = stop
        return torch.cat(logits)

    def window(self, row: int, sequences: torch.Tensor | Sequence[Sequence[int]]) -> int:
        """How many of its newest ids row's fill runs: up to block_size for a new sequence, the
        newest half window for a full one.
        """
        return min(len(sequences[row]), self.block if self.held[row] == 0 else max(1, self.block // 2))

    def step_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits (rows, vocab) after tokens (rows, 1), the next ids of cache rows 0 .. rows-1."""
        rows, cache = len(tokens), self.cache
        self.held[:rows] = [held + 1 for held in self.held[:rows]]
        if not cache.static:
            cache = cache.rows(0, rows)
        elif rows < len(cache.lengths):
            # The rows that fill next (or hold nothing) step too, from position 0: their fill
            # overwrites it, and the step keeps its shapes.
            cache.lengths[rows:] = 0
            tokens = torch.cat((tokens, tokens.new_zeros(len(cache.lengths) - rows, 1)))
        return self.step(tokens, cache=cache)[0][:rows, -1]

    def newest(self, sequences: torch.Tensor | Sequence[Sequence[int]], start: int, stop: int,
               n: int) -> torch.Tensor:
        """The newest n ids of sequences start .. stop-1, as a (rows, n) tensor on the cache's device."""
        if isinstance(sequences, torch.Tensor):  # dense strides: a compiled step guards on them
            return sequences[start:stop, -n:].clone(memory_format=torch.contiguous_format)
        device = self.cache.lengths.device
        return torch.tensor([list(ids[-n:]) for ids in sequences[start:stop]], device=device)
