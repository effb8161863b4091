"""One self-contained HTML page of an Explanation: page.html with the numbers written into it.

The page fetches nothing and needs no build step: its script draws every picture from the
numbers inside it (canvas, SVG, CSS). It draws at most MAX_LAYERS blocks of MAX_HEADS
heads over the last MAX_TOKENS tokens (a projector shows no more); what it leaves out,
and what the model did not read, it says at the top (notes()), as the command does.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt.insight.numbers import Explanation
from nanogpt.insight.reading import HEAD_RULE, TOKEN_CLASSES, EmbeddingMap, summarize_heads
from nanogpt.text.tokenizers import Tokenizer

MAX_LAYERS, MAX_HEADS, MAX_TOKENS = 12, 12, 256
TEMPLATE = Path(__file__).with_name("page.html")
DATA_MARK = "/*DATA*/null"


@dataclass
class About:
    """What the page says of the model it explains."""

    where: str  # the source, as the user named it
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    tokenizer: str  # the tokenizer's name
    iteration: int | None = None  # our runs: the checkpoint's training iteration


@dataclass
class Drawn:
    """What of an Explanation the page draws: the first layers and heads, the last tokens."""

    layers: int
    heads: int
    start: int  # the first position drawn

    @classmethod
    def of(cls, explanation: Explanation) -> Drawn:
        layers, heads, tokens = explanation.attention.shape[:3]
        return cls(min(layers, MAX_LAYERS), min(heads, MAX_HEADS), max(0, tokens - MAX_TOKENS))


def notes(explanation: Explanation, about: About, read: int) -> list[str]:
    """What was left out, one line each: of the text (read: its tokens), and of the pictures."""
    lines = []
    if explanation.cut:
        lines.append(f"the text is {read} tokens, longer than the model's block of {about.block_size}: "
                     f"shown is its {explanation.kept} {about.block_size} tokens, as the model reads them")
    layers, heads, tokens = explanation.attention.shape[:3]
    drawn = Drawn.of(explanation)
    if drawn.start:
        lines.append(f"the page draws at most {MAX_TOKENS} tokens: shown are the last {MAX_TOKENS} of the "
                     f"{tokens} read (their attention to the {drawn.start} before them is not drawn)")
    if (drawn.layers, drawn.heads) != (layers, heads):
        left = [f"blocks {drawn.layers + 1}-{layers}" if drawn.layers < layers else "",
                f"heads {drawn.heads + 1}-{heads} of each block" if drawn.heads < heads else ""]
        lines.append(f"the page draws at most {MAX_LAYERS} blocks x {MAX_HEADS} heads of attention: "
                     f"{' and '.join(x for x in left if x)} are not drawn (lm.explain() has them all)")
    return lines


def quantized_rows(attention: torch.Tensor) -> list[list[str]]:
    """Each head's causal weights in attention (L, H, T, T), as base64 bytes 0-255: rows 0, 1, .. in turn."""
    T = attention.size(-1)
    lower = attention[..., torch.tril(torch.ones(T, T, dtype=torch.bool))]  # (L, H, T (T + 1) / 2)
    quantized = (lower * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return [[base64.b64encode(head.tobytes()).decode() for head in block] for block in quantized]


def candidates_of(tokenizer: Tokenizer, ids: torch.Tensor, logprobs: torch.Tensor) -> list[list]:
    """[[text, probability], ...] for each row of ids and logprobs (T, k)."""
    return [[[tokenizer.decode([i]), round(math.exp(lp), 5)] for i, lp in zip(row, values, strict=True)]
            for row, values in zip(ids.tolist(), logprobs.tolist(), strict=True)]


def page_data(explanation: Explanation, tokenizer: Tokenizer, about: About, embedding: EmbeddingMap | None,
              page_notes: list[str]) -> dict:
    """Everything the page's script draws, as JSON-ready values (the drawn part alone)."""
    e, drawn = explanation, Drawn.of(explanation)
    s, T = drawn.start, len(e.tokens)
    attention = e.attention[:drawn.layers, :drawn.heads, s:, s:]
    summaries = summarize_heads(attention)
    after = candidates_of(tokenizer, e.top_ids, e.top_logprobs)  # the likeliest tokens after each position
    bits = e.surprise_bits
    drawn_positions = range(s, T)
    data = {
        "about": vars(about), "notes": page_notes, "head_rule": HEAD_RULE, "start": s,
        "tokens": e.tokens[s:], "uniform_bits": math.log2(about.vocab_size),
        "loss": e.loss() if T > 1 else None,
        # Token t's surprise and what the model expected in its place: read after token t - 1.
        "surprise": [None if t == 0 else round(float(bits[t - 1]), 4) for t in drawn_positions],
        "expected": [None if t == 0 else after[t - 1] for t in drawn_positions],
        "next": after[T - 1],  # what the model expects after the text
        "attention": quantized_rows(attention),
        "heads": [[{"kind": h.kind, "line": h.line} for h in block] for block in summaries],
        "lens": {"tokens": [[tokenizer.decode([int(i)]) for i in row[s:]] for row in e.lens_ids],
                 "p": [[round(math.exp(float(v)), 4) for v in row[s:]] for row in e.lens_logprobs],
                 "answer_p": [[round(math.exp(float(v)), 4) for v in row[s:]]
                              for row in e.lens_answer_logprobs]},
        "embedding": None,
    }
    if embedding is not None:
        points = [[round(x, 4), round(y, 4)] for x, y in embedding.points.tolist()]
        data["embedding"] = {"points": points,
                             "tokens": embedding.tokens, "classes": embedding.classes,
                             "class_names": list(TOKEN_CLASSES), "variance": list(embedding.variance)}
    return data


def page_html(data: dict) -> str:
    """page.html with data written into it (safe inside a script element: no "</" left in it)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    return TEMPLATE.read_text(encoding="utf-8").replace(DATA_MARK, text, 1)
