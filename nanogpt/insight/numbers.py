"""The numbers behind the pictures: what a GPT computes as it reads a text, position by position.

Everything here is read from the model's own forward pass, through GPT.hidden's record
(nanogpt/model.py): each block's attention weights, as attention() computes them, and the
residual stream after each block. Nothing is recomputed beside the model: the
log-probabilities are those of its logits, and the logit lens runs the model's own final
norm and output layer (GPT.head) on the stream after each block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanogpt.model import GPT
from nanogpt.text.tokenizers import Tokenizer

KEEPS = ("last", "first")  # which block of a text longer than the model's is read


@dataclass
class Explanation:
    """What the model computed reading T tokens; L blocks of H heads, k candidates a position.

    Position t is the model after reading tokens 0 .. t: its row of attention, its residual
    stream, and its prediction of token t + 1. All tensors are float32 (ids: long) on the CPU.
    """

    ids: torch.Tensor  # (T,) the tokens read
    tokens: list[str]  # each token's text
    attention: torch.Tensor  # (L, H, T, T): [l, h, t, s] the weight position t's query gave position s
    residual: torch.Tensor  # (L, T, n_embd): the residual stream after each block, before the final norm
    logprobs: torch.Tensor  # (T - 1,): log p(token t + 1 | tokens 0 .. t), the token that did come next
    top_ids: torch.Tensor  # (T, k): the likeliest next tokens after each position, likeliest first
    top_logprobs: torch.Tensor  # (T, k): their log-probabilities
    lens_ids: torch.Tensor  # (L, T): the logit lens: the token each block's stream would predict next
    lens_logprobs: torch.Tensor  # (L, T): that token's log-probability there
    lens_answer_logprobs: torch.Tensor  # (L, T): the log-probability there of the final answer, top_ids[:, 0]
    cut: int = 0  # tokens of the text left out to fit the model's block
    kept: str = "last"  # which block of a longer text was read: its "last" or its "first"

    @property
    def surprise_bits(self) -> torch.Tensor:
        """(T - 1,) how surprised the model was by each token after the first: -log2 p, in bits."""
        return -self.logprobs / math.log(2)

    def loss(self) -> float:
        """The mean cross-entropy over the text, in nats: the training loss on these tokens."""
        return float(-self.logprobs.mean()) if self.logprobs.numel() else float("nan")


def logit_lens(model: GPT, stream: torch.Tensor) -> torch.Tensor:
    """The logits a residual stream (..., n_embd) would give if the model stopped there.

    The model's own last steps, its final norm (ln_f) and output layer (GPT.head), run on a
    stream from inside it: after the last block this is exactly what the model predicts.
    """
    return model.head(model.transformer.ln_f(stream))


def token_texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text (a BPE token inside a character may show as U+FFFD)."""
    return [tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def explain(model: GPT, tokenizer: Tokenizer, ids: list[int], candidates: int = 5,
            keep: str = "last") -> Explanation:
    """Read ids once through the model and keep what it computed (Explanation).

    ids longer than the model's block are cut to their last block (keep="first": their
    first); Explanation.cut counts what was left out. Call it where the model computes
    (under autocast on a GPU); what it returns is float32 on the CPU.
    """
    if keep not in KEEPS:
        raise ValueError(f"keep={keep!r} is not one of {KEEPS}")
    if not ids:
        raise ValueError("no tokens to explain")
    block = model.config.block_size
    cut = max(0, len(ids) - block)
    ids = ids[cut:] if keep == "last" else ids[:block]
    idx = torch.tensor([ids], dtype=torch.long, device=model.transformer.wte.weight.device)
    record: dict = {}
    table = model.head(model.hidden(idx, record=record))[0].float().log_softmax(dim=-1)  # (T, vocab)
    top = table.topk(min(candidates, table.size(-1)))
    answer = top.indices[:, :1]
    lens_ids, lens_logprobs, lens_answer = [], [], []
    for stream in record["residual"]:
        lens = logit_lens(model, stream)[0].float()  # (T, vocab); normalized by its logsumexp alone
        norm, best = lens.logsumexp(dim=-1), lens.max(dim=-1)
        lens_ids.append(best.indices)
        lens_logprobs.append(best.values - norm)
        lens_answer.append(lens.gather(1, answer)[:, 0] - norm)
    return Explanation(
        ids=idx[0].cpu(), tokens=token_texts(tokenizer, ids),
        attention=torch.stack([w[0] for w in record["attention"]]).float().cpu(),
        residual=torch.stack([x[0] for x in record["residual"]]).float().cpu(),
        logprobs=table[:-1].gather(1, idx[0, 1:, None])[:, 0].cpu(),
        top_ids=top.indices.cpu(), top_logprobs=top.values.cpu(),
        lens_ids=torch.stack(lens_ids).cpu(), lens_logprobs=torch.stack(lens_logprobs).cpu(),
        lens_answer_logprobs=torch.stack(lens_answer).cpu(), cut=cut, kept=keep)
