"""Reading the numbers: what each attention head mostly does, and where the token embeddings lie.

The rules are stated in words (HEAD_RULE) so that the page can say how it named a head;
they are a first reading, for a student to check against the head's map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanogpt.model import GPT
from nanogpt.text.tokenizers import Tokenizer

HALF = 0.5  # a head is named by a place that takes at least this much of its weight, on average
FIRST_COUNTED = 2  # queries from the third token on (HEAD_RULE): before it, the places overlap
HEAD_RULE = (
    f"Each head is named by the place that takes at least {HALF:.0%} of its weight on average over the "
    "queries from the third token on (before it, the first token is also the one just before): "
    "a previous-token head looks at the token just before, a self head at its own token, a 2-back head "
    "two tokens back (and so on), a first-token head at the first token (a resting place where it has "
    "nothing to add, an attention sink). A head with no such place is spread: its line says over how "
    "many tokens (e to the mean entropy of its rows), how far back its weight lies on average, and the "
    "distance back that takes most of it.")
EMBEDDING_MAP_VOCAB = 256  # the most tokens whose embeddings are drawn as labelled points (characters)
TOKEN_CLASSES = ("upper-case letter", "lower-case letter", "digit", "space or newline",
                 "punctuation or other")


@dataclass
class HeadSummary:
    """What one head mostly does, by HEAD_RULE: a kind, its share of the weight and the line to show."""

    kind: str  # previous-token, first-token, self, spread, or short (a text too short to tell)
    share: float  # the average weight on that place (spread: the effective number of tokens looked at)
    line: str


def summarize_head(weights: torch.Tensor) -> HeadSummary:
    """HEAD_RULE applied to one head's attention weights (T, T) over a text."""
    return summarize_heads(weights[None, None])[0][0]


def distance_shares(attention: torch.Tensor) -> torch.Tensor:
    """(T, L, H): the weight each head gives the token d back (d = 0 .. T - 1), on average.

    The average is over the queries HEAD_RULE counts; a query with fewer than d tokens
    before it gives that place nothing.
    """
    T = attention.size(-1)
    queries = T - FIRST_COUNTED
    return torch.stack([attention.diagonal(-d, -2, -1)[..., max(0, FIRST_COUNTED - d):].sum(dim=-1) / queries
                        for d in range(T)])


def back_kind(d: int) -> tuple[str, str]:
    """The kind of a head that reads the token d back, and where the line says it looks."""
    return {0: ("self", "on its own token"), 1: ("previous-token", "on the token just before")}.get(
        d, (f"{d}-back", f"on the token {d} back"))


def summarize_heads(attention: torch.Tensor) -> list[list[HeadSummary]]:
    """HEAD_RULE applied to each block and head of attention (L, H, T, T), all heads at once."""
    L, H, T, _ = attention.shape
    if T <= FIRST_COUNTED:
        short = HeadSummary("short", float("nan"), f"a text of {FIRST_COUNTED + 1} tokens or more tells "
                                                   "what this head does")
        return [[short] * H for _ in range(L)]
    at_distance = distance_shares(attention)  # (T, L, H)
    first = attention[..., FIRST_COUNTED:, 0].mean(dim=-1)  # (L, H)
    rows = attention[..., FIRST_COUNTED:, :]
    entropy = -(rows * rows.clamp_min(1e-12).log()).sum(dim=-1).mean(dim=-1)
    distance = (torch.arange(FIRST_COUNTED, T)[:, None] - torch.arange(T)[None]).clamp_min(0)
    back = (rows * distance).sum(dim=-1).mean(dim=-1)
    summaries = []
    for layer in range(L):
        summaries.append([])
        for head in range(H):
            most = int(at_distance[:, layer, head].argmax())
            share = float(at_distance[most, layer, head])
            kind, where = back_kind(most)
            if float(first[layer, head]) > share:
                share = float(first[layer, head])
                kind, where = "first-token", "on the first token (a resting place: an attention sink)"
            if share >= HALF:
                line = f"{kind} head: {share:.0%} of its weight, on average, {where}"
                summary = HeadSummary(kind, share, line)
            else:
                looked_at, far = math.exp(float(entropy[layer, head])), float(back[layer, head])
                summary = HeadSummary("spread", looked_at, f"spread: over about {looked_at:.1f} tokens, on "
                                                           f"average {far:.1f} tokens back; the most, "
                                                           f"{float(at_distance[most, layer, head]):.0%}, "
                                                           f"{back_kind(most)[1]}")
            summaries[-1].append(summary)
    return summaries


def token_class(text: str) -> str:
    """Which of TOKEN_CLASSES a token's text falls in, by its first character."""
    first = text[:1]
    if first.isalpha():
        return TOKEN_CLASSES[0] if first.isupper() else TOKEN_CLASSES[1]
    if first.isdigit():
        return TOKEN_CLASSES[2]
    if first.isspace():
        return TOKEN_CLASSES[3]
    return TOKEN_CLASSES[4]


@dataclass
class EmbeddingMap:
    """The token embeddings projected on their two principal components."""

    points: torch.Tensor  # (vocab, 2)
    tokens: list[str]  # each token's text
    classes: list[str]  # each token's class (TOKEN_CLASSES)
    variance: tuple[float, float]  # the share of the embeddings' variance along each axis


def embedding_map(model: GPT, tokenizer: Tokenizer) -> EmbeddingMap | None:
    """The model's token embeddings on a 2-D map (PCA); None for a vocabulary too large to label.

    The embedding table is the model's own (shared with its output layer); its rows past the
    vocabulary (padding, never looked up) are left out, and the rows are centred before the
    principal directions are found.
    """
    vocab = model.config.vocab_size
    if vocab > EMBEDDING_MAP_VOCAB or vocab < 3:
        return None
    table = model.transformer.wte.weight[:vocab].detach().float().cpu()
    centred = table - table.mean(dim=0)
    _, values, directions = torch.linalg.svd(centred, full_matrices=False)
    share = values.square() / values.square().sum()
    tokens = [tokenizer.decode([i]) for i in range(vocab)]
    return EmbeddingMap(centred @ directions[:2].T, tokens, [token_class(t) for t in tokens],
                        (float(share[0]), float(share[1])))
