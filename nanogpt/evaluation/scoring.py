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

Requests that share their context (HellaSwag's four endings, any multiple-choice
task's choices) share one pass over it: the context runs once into a KV cache,
and each continuation reads that cache from its context's own length (the cache
keeps a length per row, so contexts of any lengths share a batch). A request cut
from the left (longer than the block) is read whole with the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from nanogpt.errors import DataError
from nanogpt.model import GPT, KVCache
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
    by_context, alone = defaultdict(list), []  # requests read whole, by their context; the rest
    for i, (context, continuation) in enumerate(requests):
        if inputs[i] and context and len(context) + len(continuation) - 1 <= block:
            by_context[tuple(context)].append(i)
        elif inputs[i]:
            alone.append(i)
    # A context read once for several continuations saves work; one for a single continuation does not.
    shared = sorted((members for members in by_context.values() if len(members) > 1),
                    key=lambda members: -len(requests[members[0]][0]))
    alone += [members[0] for members in by_context.values() if len(members) == 1]
    alone.sort(key=lambda i: -len(inputs[i]))
    bar = tqdm(total=sum(map(bool, inputs)), desc=desc, unit="request", disable=None if progress else True)
    with bar:
        for start in range(0, len(alone), batch_size):
            batch = alone[start:start + batch_size]
            results_of_rows(model, requests, batch, [inputs[i] for i in batch], device, dtype, results)
            bar.update(len(batch))
        for batch in context_batches(shared, requests, batch_size, block):
            score_shared_contexts(model, requests, batch, device, dtype, results)
            bar.update(sum(map(len, batch)))
    return results


def results_of_rows(model: GPT, requests: Sequence[Request], batch: list[int], rows_ids: list[list[int]],
                    device: torch.device, dtype: torch.dtype, results: list, cache: KVCache | None = None,
                    first_logits: torch.Tensor | None = None) -> None:
    """Score requests batch, row r reading rows_ids[r] (after the cache, where given), into results.

    first_logits (one row per request), where given, predicts each continuation's
    first token: the context's last position, already run into the cache.
    """
    width = max(map(len, rows_ids))
    idx = torch.zeros(len(batch), max(width, 1), dtype=torch.long)
    rows, positions, targets, owners = [], [], [], []
    for row, (i, ids) in enumerate(zip(batch, rows_ids, strict=True)):
        idx[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        continuation = requests[i][1]
        # The continuation's n tokens are predicted at the last n positions the model reads
        # (with first_logits, the first of them was predicted before these rows).
        scored = continuation[1:] if first_logits is not None else continuation
        rows += [row] * len(scored)
        positions += range(len(ids) - len(scored), len(ids))
        targets += scored
        owners += [row] * len(scored)
    logits = []
    if first_logits is not None:
        logits.append(first_logits)
        owners = list(range(len(batch))) + owners
        targets = [requests[i][1][0] for i in batch] + targets
    if rows:
        with autocast(device, dtype):
            logits.append(model.logits_at(idx.to(device), torch.tensor(rows, device=device),
                                            torch.tensor(positions, device=device), cache))
    # log_softmax at the target alone: the (N, vocab) table of every log-probability is never
    # needed, and each part of the logits is read where it is, never copied into one table.
    chosen, wrong = [], []
    for part, target in zip(logits, torch.tensor(targets, device=device).split([len(p) for p in logits]),
                            strict=True):
        part = part.float()
        chosen.append(part.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(part, dim=-1))
        wrong.append((part.argmax(dim=-1) != target).float())
    owner = torch.tensor(owners, device=device)
    sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
        0, owner, torch.cat(chosen).double())
    missed = torch.zeros(len(batch), device=device).index_add_(0, owner, torch.cat(wrong))
    for row, i in enumerate(batch):
        results[i] = (sums[row].item(), bool(missed[row].item() == 0))


def context_batches(groups: list[list[int]], requests: Sequence[Request], batch_size: int,
                    block: int) -> Iterator[list[list[int]]]:
    """Groups of requests sharing a context (longest first), batch_size groups a batch at most.

    A batch's rows are padded to its longest continuation, after its longest
    context: a batch ends before that would take a position past the block.
    """
    batch: list[list[int]] = []
    widest = 0  # the longest continuation in the batch, as the model reads it (all but its last token)
    for members in groups:
        width = max(widest, *(len(requests[i][1]) - 1 for i in members))
        if batch and (len(batch) == batch_size or len(requests[batch[0][0]][0]) + width > block):
            yield batch
            batch, width = [], max(len(requests[i][1]) - 1 for i in members)
        batch.append(members)
        widest = width
    if batch:
        yield batch


def score_shared_contexts(model: GPT, requests: Sequence[Request], groups: list[list[int]],
                          device: torch.device, dtype: torch.dtype, results: list) -> None:
    """Score groups of requests (each group one context), one pass over each context.

    The contexts are padded on the right into one batch; each row's cache then
    keeps its context's own length, so its continuations' tokens take the
    positions after it (overwriting the padding's keys, which no query sees).
    """
    lengths = [len(requests[members[0]][0]) for members in groups]
    contexts = torch.zeros(len(groups), max(lengths), dtype=torch.long)
    for row, members in enumerate(groups):
        contexts[row, :lengths[row]] = torch.tensor(requests[members[0]][0], dtype=torch.long)
    last = torch.tensor(lengths, device=device) - 1
    with autocast(device, dtype):
        cache = model.new_cache(len(groups), max(lengths))
        # The logits after each context's last token predict its continuations' first tokens.
        first = model.logits_at(contexts.to(device), torch.arange(len(groups), device=device),
                                  last, cache)
    # Every request gets its context's keys and values, and the logits that predict its first token.
    counts = torch.tensor([len(members) for members in groups], device=device)
    batch = [i for members in groups for i in members]
    rows_ids = [list(requests[i][1][:-1]) for i in batch]  # each continuation but its last token
    rows_cache = model.new_cache(len(batch), max(lengths) + max(map(len, rows_ids)), cache.keys.dtype)
    rows_cache.keys[:, :, :, :max(lengths)] = cache.keys.repeat_interleave(counts, dim=1)
    rows_cache.values[:, :, :, :max(lengths)] = cache.values.repeat_interleave(counts, dim=1)
    rows_cache.lengths.copy_((last + 1).repeat_interleave(counts))
    results_of_rows(model, requests, batch, rows_ids, device, dtype, results,
                    cache=rows_cache if any(rows_ids) else None,
                    first_logits=first.repeat_interleave(counts, dim=0))
