"""How a generation picks its tokens and when it ends: one value, from where it is asked for to the loop.

A command's keys (``temperature=``, ``top_k=``, ...: SamplingSettings, which
sample, chat and serve extend), an HTTP request's fields and ``lm.generate``'s
keyword arguments all become one Sampling, which carries them to the decoding
loop (nanogpt/model.py's Decoder, through LanguageModel or the server's Engine).
A new sampling option is declared here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from nanogpt.model import sample_next_token
from nanogpt.options import option, require


@dataclass
class SamplingSettings:
    """How each next token is picked, and the text that ends a generation."""

    temperature: float = option(0.8, "0: always the likeliest token; higher: more varied")
    top_k: int | None = option(200, "sample only among the k likeliest tokens; null: all")
    top_p: float | None = option(None, "nucleus sampling, e.g. 0.9; null: off")
    seed: int | None = option(1337, "seeds the sampling; null: a different draw each time")
    stop: list[str] = option(default_factory=list, help="text that ends a generation where it appears "
                                                        "(and is not shown), e.g. '[\"\\n\\n\"]'")

    def __post_init__(self) -> None:
        # A NaN passes every comparison's negation, so finiteness is asked for first.
        require(math.isfinite(self.temperature) and self.temperature >= 0,
                f"temperature={self.temperature} must be a number >= 0 (0 picks the likeliest token)")
        require(self.top_k is None or self.top_k >= 1,
                f"top_k={self.top_k} must be at least 1, or null for no top-k filter")
        require(self.top_p is None or 0 < self.top_p <= 1,
                f"top_p={self.top_p} must be in (0, 1], or null for no nucleus filter")
        self.stop = [text for text in self.stop if text]  # an empty stop string would end at once

    def sampling(self, max_new_tokens: int) -> Sampling:
        """These settings with a token budget: the value the decoding loop takes."""
        return Sampling(**{f.name: getattr(self, f.name) for f in fields(SamplingSettings)},
                        max_new_tokens=max_new_tokens)


@dataclass
class Sampling(SamplingSettings):
    """Everything a generation needs to know of how to run: the settings, and at most how many tokens."""

    max_new_tokens: int = option(500, "the most new tokens to generate")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_new_tokens >= 0, f"max_new_tokens={self.max_new_tokens} must be >= 0")

    def next_token(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of logits (rows, vocab), picked as these settings say."""
        return sample_next_token(logits, self.temperature, self.top_k, self.top_p, generator)

    def generator(self, device: torch.device) -> torch.Generator:
        """A generator on device seeded with seed (or, with none, from the operating system's entropy)."""
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator
