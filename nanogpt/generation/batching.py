"""Many generations decoded together: how one model answers requests that arrive at any time.

A server's requests come and go independently. Generating them one after the
other would make each wait for all before it; running each in its own thread
would make them fight over the same cores. Instead one thread (the Engine) owns
the model and a KVCache with a row per slot, and repeats a step:

* requests that left (finished, or their client went away) free their rows at
  once; the busiest rows stay packed at the front (move_row), so the
  rows that decode are always rows 0 .. d-1;
* waiting requests join: each is prefilled into a free row of its own (its
  length zeroed, then its prompt run through ``cache_rows(cache, r, r + 1)``);
* one call, decode(), computes the next token's logits for rows 0 .. d-1 at
  once: a batch of d single tokens, whose cost on a CPU or GPU is little more
  than one row's. It is the one place a compiled, fixed-shape step can take over;
* each row samples its token with its own settings and its own seeded
  torch.Generator, and hears of it (Sequence.on_token) before the next step.

Each row follows exactly the rule of GPT.stream: prefill the prompt (its last
block_size tokens), then one token at a time, and when its row is full, fill it
again from the newest half window. A request alone therefore gets exactly the
tokens ``LanguageModel.stream`` (and so ``nanogpt.sample``) gives for the same
seed and settings; in company its logits come from a larger batch, which may
differ in the last bits, so only a near-tie between two tokens can turn out
differently. Nothing here knows of HTTP: nanogpt/serving/ puts a server around
an Engine, and tests drive one directly (Engine.generate).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from nanogpt.model import GPT, KVCache, sample_next_token
from nanogpt.runtime.device import autocast

log = logging.getLogger("nanogpt.batching")

# Why a generation ended. LENGTH and STOP are OpenAI's finish_reason values.
LENGTH, STOP, CANCELLED, ABORTED, FAILED = "length", "stop", "cancelled", "aborted", "failed"


def cache_rows(cache: KVCache, start: int, stop: int) -> KVCache:
    """Rows start .. stop-1 of cache as a cache of their own: views, so what they store lands there."""
    view = copy.copy(cache)
    view.keys, view.values = cache.keys[:, start:stop], cache.values[:, start:stop]
    view.lengths = cache.lengths[start:stop]
    return view


def move_row(cache: KVCache, source: int, target: int) -> None:
    """Copy row source of cache into row target: the busy rows are packed as requests leave."""
    cache.keys[:, target] = cache.keys[:, source]
    cache.values[:, target] = cache.values[:, source]
    cache.lengths[target] = cache.lengths[source]


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens (sample_next_token's settings) and the seed of its generator."""

    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model (before temperature and filters) and the likeliest ones."""

    logprob: float
    top: list[tuple[int, float]]  # (token, log-probability), likeliest first


class Generation:
    """One request's tokens: its prompt, how it samples, when it ends, and who hears of each token.

    on_token(token, logprobs) is called in the engine's thread as each token is
    sampled (logprobs only when top_logprobs is not None); returning True ends
    the generation there (a stop string was written). on_finish(reason) is
    called once, last: LENGTH, STOP (after a token of stop_ids, which on_token
    hears too, or when on_token said so), ABORTED (the engine stopped) or
    FAILED (an error, logged). A generation that is cancelled hears nothing more.
    """

    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), top_logprobs: int | None = None,
                 on_token: Callable[[int, TokenLogprobs | None], bool | None] | None = None,
                 on_finish: Callable[[str], None] | None = None):
        if not prompt_ids:
            raise ValueError("a generation needs at least one prompt token to continue")
        self.ids = list(prompt_ids)  # the prompt, then each new token
        self.prompt_length = len(self.ids)
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.stop_ids, self.top_logprobs = frozenset(stop_ids), top_logprobs
        self.on_token, self.on_finish = on_token, on_finish
        self.generator: torch.Generator | None = None  # made on the engine's device when it joins
        self.held = 0  # tokens of ids in its cache row (0: not prefilled yet)
        self.cancelled = False
        self.finish_reason: str | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - self.prompt_length

    def finish(self, reason: str) -> None:
        """End the generation with reason (once); tell its owner unless it was cancelled."""
        if self.finish_reason is None:
            self.finish_reason = reason
            if self.on_finish is not None and not self.cancelled:
                self.on_finish(reason)


class Engine:
    """A model, a KVCache of `slots` rows and the thread that decodes every active generation together.

    submit() and cancel() may be called from any thread; so may call(), which
    runs a function in the engine's thread between two steps (the server scores
    prompts that way, so the model is only ever used by one thread). Generations
    beyond the slots wait their turn, first come first served.
    """

    def __init__(self, model: GPT, slots: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.model, self.slots, self.device, self.dtype = model, slots, device, dtype
        self.block = model.config.block_size
        with autocast(device, dtype):
            self.cache = model.new_cache(slots)
        self.rows: list[Generation] = []  # row r of the cache holds rows[r]
        self.waiting: deque[Generation] = deque()
        self.jobs: deque[tuple[Callable[[], object], Future]] = deque()
        # Re-entrant: stop() may be called by a signal handler while this thread holds the lock.
        self.changed = threading.Condition(threading.RLock())
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.generated = 0  # tokens sampled since the start, all generations together

    # Called from other threads.

    def start(self) -> Engine:
        self.thread = threading.Thread(target=self.run, name="nanogpt-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """End every generation (ABORTED) and the engine's thread, after the step under way."""
        with self.changed:
            self.stopping = True
            self.changed.notify()
        if wait and self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def submit(self, generation: Generation) -> None:
        with self.changed:
            if self.stopping:
                generation.finish(ABORTED)
                return
            self.waiting.append(generation)
            self.changed.notify()

    def cancel(self, generation: Generation) -> None:
        """Forget a generation (its client went away): its row is free before the next step."""
        with self.changed:
            generation.cancelled = True
            self.changed.notify()

    def call(self, function: Callable[[], object]) -> Future:
        """Run function in the engine's thread between two steps; its result or error comes in the Future."""
        future: Future = Future()
        with self.changed:
            if self.stopping:
                future.set_exception(RuntimeError("the engine has stopped"))
                return future
            self.jobs.append((function, future))
            self.changed.notify()
        return future

    @property
    def busy(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Each new token as it is sampled, for a caller in another thread; closing the iterator cancels."""
        tokens: queue.Queue = queue.Queue()

        def heard(token: int, _) -> None:
            if token not in stop_ids:  # a stop token ends the generation unseen
                tokens.put(token)

        generation = Generation(prompt_ids, max_new_tokens, sampling, stop_ids, on_token=heard,
                                on_finish=tokens.put)
        self.submit(generation)
        try:
            while isinstance(item := tokens.get(), int):
                yield item
            if item == FAILED:
                raise RuntimeError("generation failed; the engine logged why")
        finally:
            self.cancel(generation)

    # The engine's own thread.

    def run(self) -> None:
        while True:
            with self.changed:
                while not (self.rows or self.waiting or self.jobs or self.stopping):
                    self.changed.wait()
                if self.stopping:
                    break
                jobs = list(self.jobs)
                self.jobs.clear()
                self.release([g for g in self.rows if g.cancelled])
                while self.waiting and len(self.rows) < self.slots:
                    generation = self.waiting.popleft()
                    if not generation.cancelled:
                        self.rows.append(generation)
            for function, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except Exception as error:  # the caller's to report
                        future.set_exception(error)
            if self.rows:
                try:
                    self.step()
                except Exception:  # a bug or an exhausted device: fail these requests, keep serving
                    log.exception("a decoding step failed; its %d requests end with an error", len(self.rows))
                    for generation in self.rows:
                        generation.finish(FAILED)
                    self.release(list(self.rows))
        with self.changed:
            for generation in [*self.rows, *self.waiting]:
                generation.finish(ABORTED)
            self.rows.clear()
            self.waiting.clear()
            for _, future in self.jobs:
                future.set_exception(RuntimeError("the engine has stopped"))
            self.jobs.clear()

    @torch.no_grad()
    def step(self) -> None:
        """One token for every row: decode the rows in step, prefill those that joined or are full."""
        filling = [g for g in self.rows if g.held in (0, self.block)]
        self.pack_to_end(filling)
        decoding = len(self.rows) - len(filling)
        with autocast(self.device, self.dtype):
            logits = []
            if decoding:
                last = torch.tensor([[g.ids[-1]] for g in self.rows[:decoding]], device=self.device)
                logits += list(self.decode(last, decoding).split(1))
                for generation in self.rows[:decoding]:
                    generation.held += 1
            logits += [self.prefill(row) for row in range(decoding, len(self.rows))]
            ended = [g for g, g_logits in zip(self.rows, logits, strict=True) if self.advance(g, g_logits)]
        self.release(ended)

    def decode(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        """The next-token logits (rows, vocab) after tokens (rows, 1): a new token for cache rows 0 .. rows-1.

        The hot path: every row in step costs one position. A compiled step with
        fixed shapes (all slots, always) can replace this call.
        """
        logits, _ = self.model(tokens, cache=cache_rows(self.cache, 0, rows))
        return logits[:, -1]

    def prefill(self, row: int) -> torch.Tensor:
        """Run row's context into its cache row, as GPT.stream does; the logits (1, vocab) after it.

        A generation that joins brings its prompt (its last block_size tokens); a
        row that is full starts again from the newest half window, so every
        token still sees at least block_size // 2 tokens, at correct positions.
        """
        generation = self.rows[row]
        if generation.held == 0:
            generation.generator = torch.Generator(device=self.device).manual_seed(generation.sampling.seed)
        held = min(len(generation.ids), self.block if generation.held == 0 else max(1, self.block // 2))
        cache = cache_rows(self.cache, row, row + 1)
        cache.lengths.zero_()
        context = torch.tensor([generation.ids[-held:]], device=self.device)
        logits, _ = self.model(context, cache=cache)
        generation.held = held
        return logits[:, -1]

    def advance(self, generation: Generation, logits: torch.Tensor) -> bool:
        """Sample generation's next token from its logits (1, vocab), pass it on; True when it has ended."""
        s = generation.sampling
        token = int(sample_next_token(logits, s.temperature, s.top_k, s.top_p, generation.generator))
        if generation.cancelled:
            return True
        generation.ids.append(token)
        self.generated += 1
        logprobs = None
        if generation.top_logprobs is not None:
            table = logits[0].float().log_softmax(dim=-1)
            best = table.topk(min(generation.top_logprobs, table.numel()))
            top = list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
            logprobs = TokenLogprobs(float(table[token]), top)
        try:
            stopped = generation.on_token is not None and generation.on_token(token, logprobs)
        except Exception:  # the listener's bug ends its own generation, not the others'
            log.exception("a token's listener failed; its generation ends")
            generation.finish(FAILED)
            return True
        if stopped or token in generation.stop_ids:
            generation.finish(STOP)
        elif generation.new_tokens >= generation.max_new_tokens:
            generation.finish(LENGTH)
        return generation.finish_reason is not None

    def pack_to_end(self, moving: list[Generation]) -> None:
        """Put the generations `moving` in the last rows, the others in the first, moving few rows."""
        first = len(self.rows) - len(moving)
        to_end = {id(g) for g in moving}
        holes = [r for r in range(first) if id(self.rows[r]) in to_end]
        movers = [r for r in range(first, len(self.rows)) if id(self.rows[r]) not in to_end]
        for hole, mover in zip(holes, movers, strict=True):
            # The generation in `hole` is about to be prefilled again: its keys need not be kept.
            move_row(self.cache, mover, hole)
            self.rows[hole], self.rows[mover] = self.rows[mover], self.rows[hole]

    def release(self, leaving: list[Generation]) -> None:
        """Free the rows of leaving: the last busy row moves into each, so busy rows stay packed."""
        for generation in leaving:
            row = next(r for r, g in enumerate(self.rows) if g is generation)
            last = len(self.rows) - 1
            if row != last:
                move_row(self.cache, last, row)
                self.rows[row] = self.rows[last]
            self.rows.pop()
