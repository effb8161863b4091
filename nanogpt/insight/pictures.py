"""The page's pictures as PNGs (matplotlib, drawn off-screen): for slides, reports and notebooks.

Each *_figure function returns a matplotlib Figure of the part of an Explanation the page
draws (page.Drawn); a notebook shows it as it is, and write_pictures saves them all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanogpt.fileio import write_atomically
from nanogpt.insight.numbers import Explanation
from nanogpt.insight.page import Drawn
from nanogpt.insight.reading import TOKEN_CLASSES, EmbeddingMap, summarize_heads
from nanogpt.text.tokenizers import Tokenizer

MAP_CELLS = 128  # the most cells along a side of one attention map in attention.png (the page draws all)
LABELLED = 64  # tokens up to which every one is labelled on an axis; beyond, every few
CLASS_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#7f7f7f", "#9467bd")


def label(text: str) -> str:
    """A token as a label: spaces, newlines and tabs visible, and no "$" for matplotlib to read as maths."""
    shown = text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"
    return shown.replace("$", r"\$")


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def tick_every(count: int) -> int:
    return 1 if count <= LABELLED else -(-count // LABELLED)


def surprise_figure(explanation: Explanation):
    """Each token's surprise in bits, a bar a token, the tokens along the bottom."""
    e, s = explanation, Drawn.of(explanation).start
    tokens = e.tokens[s:]
    bits = [0.0 if t == 0 else float(e.surprise_bits[t - 1]) for t in range(s, len(e.tokens))]
    figure = new_figure(max(6.0, 0.22 * len(tokens) + 1.5), 3.2)
    axes = figure.add_subplot()
    axes.bar(range(len(tokens)), bits, color="#d62728")
    every = tick_every(len(tokens))
    axes.set_xticks(range(0, len(tokens), every), [label(t) for t in tokens[::every]], family="monospace")
    axes.set_ylabel("surprise, bits (-log2 p)")
    axes.set_title(f"How surprised the model was by each token (mean {e.loss():.3f} nats)"
                   if len(e.tokens) > 1 else "A single token: nothing predicts it")
    axes.set_xlim(-0.6, len(tokens) - 0.4)
    return figure


def attention_figure(explanation: Explanation):
    """Every drawn block's and head's attention map, a row a block, with each head's kind above it.

    The maps are tiles of one image, the future of each left blank: 144 axes of their own
    would take a layout engine seconds to place. A map over more than MAP_CELLS tokens is
    drawn in squares of a few tokens, each as dark as the largest weight in it.
    """
    e, drawn = explanation, Drawn.of(explanation)
    weights = e.attention[:drawn.layers, :drawn.heads, drawn.start:, drawn.start:]
    summaries = summarize_heads(weights)
    future = torch.ones(weights.shape[-2:], dtype=torch.bool).triu(diagonal=1)
    maps = weights.masked_fill(future, float("nan"))
    if maps.size(-1) > MAP_CELLS:  # a square of cells drawn as one: its largest weight, so no head fades
        maps = torch.nn.functional.adaptive_max_pool2d(maps.nan_to_num(-1.0), MAP_CELLS)
        maps = maps.masked_fill(maps < 0, float("nan"))
    T = maps.size(-1)
    gap = max(2, T // 4)  # blank pixels between the tiles, room for each head's kind
    step = T + gap
    mosaic = torch.full((drawn.layers * step, drawn.heads * step), float("nan"))
    for layer in range(drawn.layers):
        for head in range(drawn.heads):
            mosaic[gap + layer * step:(layer + 1) * step, head * step:head * step + T] = maps[layer, head]
    side = 1.15 if drawn.heads > 6 else 1.6  # inches a map
    figure = new_figure(max(5.5, side * drawn.heads + 0.8), side * drawn.layers + 1.0)
    axes = figure.add_subplot()
    axes.imshow(mosaic.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for layer in range(drawn.layers):
        for head in range(drawn.heads):
            summary = summaries[layer][head]
            kind = summary.kind if summary.kind != "spread" else f"spread ~{summary.share:.1f}"
            axes.text(head * step, layer * step + gap * 0.9, kind, fontsize=7, va="bottom")
    centre = (T - 1) / 2
    axes.set_xticks([h * step + centre for h in range(drawn.heads)],
                    [f"head {h + 1}" for h in range(drawn.heads)], fontsize=8)
    axes.set_yticks([gap + layer * step + centre for layer in range(drawn.layers)],
                    [f"block {layer + 1}" for layer in range(drawn.layers)], fontsize=8)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.set_title("Attention: in each map, row t is what token t reads\n(weight 0 white .. 1 dark; "
                   "the future blank)", fontsize=10)
    return figure


def lens_figure(explanation: Explanation, tokenizer: Tokenizer):
    """The logit lens: after each block (rows), the final answer's probability at each position."""
    e, s = explanation, Drawn.of(explanation).start
    tokens = e.tokens[s:]
    answer_p = e.lens_answer_logprobs[:, s:].exp()
    layers, count = answer_p.shape
    figure = new_figure(max(6.0, 0.42 * count + 2), 0.42 * layers + 1.6)
    axes = figure.add_subplot()
    image = axes.imshow(answer_p.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto",
                        interpolation="nearest")
    if count <= LABELLED:
        for layer in range(layers):
            for t in range(count):
                axes.text(t, layer, label(tokenizer.decode([int(e.lens_ids[layer, s + t])]))[:4], ha="center",
                          va="center", fontsize=7, family="monospace",
                          color="white" if answer_p[layer, t] > 0.6 else "black")
    every = tick_every(count)
    axes.set_xticks(range(0, count, every), [label(t) for t in tokens[::every]], family="monospace")
    axes.set_yticks(range(layers), [f"block {layer + 1}" for layer in range(layers)])
    axes.set_xlabel("after reading")
    axes.set_title("Logit lens: each block's next-token guess, shaded by p(final answer)")
    figure.colorbar(image, ax=axes, shrink=0.8, label="p(final answer)")
    return figure


def embedding_figure(embedding: EmbeddingMap):
    """The token embeddings on their two principal components, each token drawn as its own text."""
    figure = new_figure(7.5, 5.5)
    axes = figure.add_subplot()
    points = embedding.points
    axes.scatter(points[:, 0], points[:, 1], s=0)  # texts alone leave the axes' limits unset
    colours = dict(zip(TOKEN_CLASSES, CLASS_COLOURS, strict=True))
    for (x, y), token, kind in zip(points.tolist(), embedding.tokens, embedding.classes, strict=True):
        axes.text(x, y, label(token), color=colours[kind], ha="center", va="center", family="monospace",
                  fontsize=10)
    handles = [axes.scatter([], [], color=c, marker="s") for c in CLASS_COLOURS]
    axes.legend(handles, TOKEN_CLASSES, fontsize=8, loc="best")
    axes.set_xlabel(f"1st principal component ({embedding.variance[0]:.0%} of the variance)")
    axes.set_ylabel(f"2nd principal component ({embedding.variance[1]:.0%})")
    axes.set_title("Token embeddings")
    return figure


def write_pictures(folder: Path, explanation: Explanation, tokenizer: Tokenizer,
                   embedding: EmbeddingMap | None) -> list[Path]:
    """surprise.png, attention.png, logit_lens.png and (a small vocabulary) embeddings.png in folder."""
    figures = {"surprise.png": surprise_figure(explanation), "attention.png": attention_figure(explanation),
               "logit_lens.png": lens_figure(explanation, tokenizer)}
    if embedding is not None:
        figures["embeddings.png"] = embedding_figure(embedding)
    written = []
    for name, figure in figures.items():
        path = Path(folder) / name
        write_atomically(path, lambda tmp, figure=figure: figure.savefig(tmp, format="png", dpi=100))
        written.append(path)
    return written
