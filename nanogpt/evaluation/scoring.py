"""Log-likelihoods of continuations: what HellaSwag and every lm-evaluation-harness task ask of a model.

A request is a context and a continuation, as token ids. Its score is the summed
log-probability of the continuation's tokens, each given everything before it,
and whether every one of them is the model's likeliest next token (greedy).
The rules are lm-evaluation-harness's, so that the numbers are its numbers:

* context and continuation are cut from the text as lm-eval cuts them
  (encode_pair): whitespace at the end of the context moves into the
  continuation, the context is encoded alone, and the continuation is what
  follows as many ids of the whole text encoded at once;
* a request longer than the model's block loses tokens from the left: the model
  reads the last block_size of (context + continuation)[:-1].

Requests are batched, longest first (the rows of a batch then have nearly the same
length, so little is padded), padded on the right (a causal model's earlier
positions never see the padding), and only the continuation's positions go
through the output layer: for a GPT-2-sized vocabulary that layer is a large part
of the work, and the context's logits are never needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from nanogpt.errors import DataError
from nanogpt.model import GPT
from nanogpt.runtime.device import autocast

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_token: int | None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a text pair, cut as lm-evaluation-harness cuts them.

    An empty context becomes the prefix token (the end-of-text token), as in
    lm-eval, so that the continuation's first token is predicted from something.
    """
    if not context:
        ids = encode(continuation)
        if prefix_token is None or (ids and ids[0] == prefix_token):
            return ids[:1], ids[1:]
        return [prefix_token], ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    # As lm-eval does: the context's own ids, and the ids of the whole text after as many as those.
    # Where a token spans the cut, the two do not add up to the whole; lm-eval scores them so.
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


def next_token_logits(model: GPT, idx: torch.Tensor, rows: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """The model's logits (N, vocab) for the token after positions[i] of row rows[i] of idx.

    GPT.forward without targets computes the output layer at the last position
    only; the final hidden states of every position are taken as they leave the
    last norm (ln_f), and only those asked for go through the output layer and
    the logit cap, as GPT.forward would apply them.
    """
    hidden = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, args, output: hidden.append(output))
    try:
        model(idx)
    finally:
        hook.remove()
    logits = model.lm_head(hidden[0][rows, positions])[..., : model.config.vocab_size]
    cap = model.config.logit_softcap
    return cap * torch.tanh(logits / cap) if cap else logits


def model_inputs(context: Sequence[int], continuation: Sequence[int], block: int) -> list[int]:
    """The ids the model reads for a request: the last block of (context + continuation) but its last id."""
    if not continuation:
        return []
    if len(continuation) > block:
        raise DataError(f"a continuation of {len(continuation)} tokens does not fit the model's block of "
                        f"{block} tokens; lm-evaluation-harness refuses it too")
    return (list(context) + list(continuation))[-(block + 1):][:-1]


@torch.no_grad()
def score_requests(model: GPT, requests: Sequence[Request], batch_size: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, progress: bool = True,
                   desc: str = "scoring") -> list[tuple[float, bool]]:
    """(summed log-probability, greedy) of each request's continuation given its context.

    An empty continuation scores (0.0, True).
    """
    block = model.config.block_size
    inputs = [model_inputs(context, continuation, block) for context, continuation in requests]
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    order = sorted((i for i in range(len(requests)) if inputs[i]), key=lambda i: -len(inputs[i]))
    with tqdm(total=len(order), desc=desc, unit="request", disable=None if progress else True) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            idx = torch.zeros(len(batch), len(inputs[batch[0]]), dtype=torch.long)
            rows, positions, targets, owners = [], [], [], []
            for row, i in enumerate(batch):
                ids, continuation = inputs[i], requests[i][1]
                idx[row, : len(ids)] = torch.tensor(ids)
                # The continuation's n tokens are predicted at the last n positions the model reads.
                first = len(ids) - len(continuation)
                rows += [row] * len(continuation)
                positions += range(first, len(ids))
                targets += continuation
                owners += [row] * len(continuation)
            with autocast(device, dtype):
                logits = next_token_logits(model, idx.to(device), torch.tensor(rows, device=device),
                                           torch.tensor(positions, device=device))
            logits = logits.float()
            target = torch.tensor(targets, device=device)
            # log_softmax at the target alone: the (N, vocab) table of every log-probability is never needed.
            chosen = logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            owner = torch.tensor(owners, device=device)
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
                0, owner, chosen.double())
            missed = torch.zeros(len(batch), device=device).index_add_(
                0, owner, (logits.argmax(dim=-1) != target).float())
            for row, i in enumerate(batch):
                results[i] = (sums[row].item(), bool(missed[row].item() == 0))
            bar.update(len(batch))
    return results
