"""The Python face: ``nanogpt.load(source)`` gives a LanguageModel, a GPT with its tokenizer: text in and out.

``python -m nanogpt.sample`` prints exactly what LanguageModel.stream() yields,
so generate() with the same settings returns the same text as the command.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from nanogpt.dataset.tokenizers import UnknownTokenError, tokenizer_codec
from nanogpt.errors import ConfigError, DataError
from nanogpt.model import GPT
from nanogpt.runtime.device import autocast, resolve_device, resolve_dtype
from nanogpt.weights.loading import LoadedSource, resolve_source
from nanogpt.weights.quantize import QUANTIZATIONS, quantize_model


class LanguageModel:
    """A GPT with its tokenizer: text in, text out. Made by nanogpt.load().

    ``python -m nanogpt.sample`` prints exactly what stream() yields, so
    generate() with the same settings returns the same text as the command.
    """

    def __init__(self, loaded: LoadedSource, device: torch.device, dtype: torch.dtype,
                 quantize: str | None = None):
        self.model = quantize_model(loaded.model.to(device).eval(), quantize, device)
        self.tokenizer = loaded.tokenizer
        self.encode, self.decode = tokenizer_codec(loaded.tokenizer)
        self.device, self.dtype = device, dtype
        self.source = loaded

    def __repr__(self) -> str:
        c = self.model.config
        return (f"LanguageModel({self.source.where!r}: {c.n_layer} layers, {c.n_head} heads, "
                f"{c.n_embd} wide, block {c.block_size}, {self.tokenizer['kind']} vocabulary, {self.device})")

    def generate(self, prompt: str, max_new_tokens: int = 500, temperature: float = 0.8,
                 top_k: int | None = 200, top_p: float | None = None, seed: int = 1337,
                 use_cache: bool = True) -> str:
        """The prompt followed by max_new_tokens generated tokens, decoded.

        The defaults are nanogpt.sample's; temperature=0 (or top_k=1) is greedy.
        """
        new = self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed=seed, use_cache=use_cache)
        return prompt + "".join(new)

    def stream(self, prompt: str, max_new_tokens: int = 500, temperature: float = 0.8,
               top_k: int | None = 200, top_p: float | None = None, seed: int | None = 1337,
               use_cache: bool = True, generator: torch.Generator | None = None) -> Iterator[str]:
        """Yield the new text piece by piece as tokens are sampled (not repeating the prompt).

        Everything so far is decoded at each token and only what is new is
        yielded, so a character made of several BPE tokens appears once it is
        whole. generator, if given, is used instead of a fresh one seeded with seed.
        """
        if not prompt:
            raise ConfigError("the prompt is empty; the model needs at least one token to continue")
        try:
            prompt_ids = self.encode(prompt)
        except UnknownTokenError as e:
            raise DataError(f"prompt: {e} of {self.source.where}") from None
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        ids: list[int] = []
        shown = ""
        with autocast(self.device, self.dtype):
            for token in self.model.stream(idx, max_new_tokens, temperature, top_k, top_p,
                                           use_cache=use_cache, generator=generator):
                ids.append(int(token))
                text = self.decode(ids)
                yield text[len(shown):]
                shown = text


def load(source: str | Path, device: str = "auto", dtype: str = "auto",
         meta: str | Path | None = None, quantize: str | None = None) -> LanguageModel:
    """A model ready to generate text, from any source nanogpt knows (see ACCEPTED).

    device is auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps; dtype
    auto (bfloat16 or float16 on CUDA, else float32), float32, bfloat16 or
    float16. meta points at a karpathy/nanoGPT meta.pkl that is not where
    nanoGPT's own sample.py would find it. quantize="int8" stores the Linear
    weights as int8 for faster generation on a CPU (nanogpt/weights/quantize.py).
    """
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize={quantize!r} is not one of {', '.join(map(repr, QUANTIZATIONS))}")
    torch_device = resolve_device(device)
    loaded = resolve_source(source, key="source", meta=meta)
    return LanguageModel(loaded, torch_device, resolve_dtype(dtype, torch_device), quantize)


def sample_text(model: GPT, tokenizer: dict, num_tokens: int, device: torch.device) -> str:
    """What the model writes after a newline (temperature 1, top_k 200): a glance at what it learned."""
    encode, decode = tokenizer_codec(tokenizer)
    try:
        start = encode("\n")
    except UnknownTokenError:  # a character vocabulary without newlines
        start = [0]
    model.eval()
    ids = model.generate(torch.tensor([start], device=device), num_tokens, temperature=1.0, top_k=200)
    return decode(ids[0].tolist())
