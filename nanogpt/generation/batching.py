"""Many generations decoded together: how one model answers requests that arrive at any time.

A server's requests come and go independently. Generating them one after the
other would make each wait for all before it; running each in its own thread
would make them fight over the same cores. Instead one thread (the Engine) owns
the model and a Decoder (nanogpt/model.py) with a KV-cache row per slot, and
repeats a step:

* requests that left (finished, or their client went away) free their rows at
  once; the busy rows stay packed at the front (move_row), those that step
  before those that fill, as the Decoder takes them;
* waiting requests join, each in a free row of its own;
* one call, Decoder.next_logits(), gives every row its next token's logits: the
  rows that step go as one batch of single tokens, whose cost on a CPU or GPU is
  little more than one row's (through the compiled step where device.compile
  asks for it), and each row that joined or is full is (re)filled;
* each row samples its token with its own settings (a Sampling) and its own
  seeded torch.Generator, and hears of it (Generation.on_token) before the next step.

The rows follow the Decoder's one rule, the rule of GPT.stream, so a request
alone gets exactly the tokens ``LanguageModel.stream`` (and so ``nanogpt.sample``)
gives for the same seed and settings; in company its logits come from a larger
batch, which may differ in the last bits, so only a near-tie between two tokens
can turn out differently. Nothing here knows of HTTP: nanogpt/serving/ puts a
server around an Engine, and tests drive one directly (Engine.generate).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from nanogpt.decoding import Decoder
from nanogpt.generation.language_model import LanguageModel
from nanogpt.generation.sampling import Sampling
from nanogpt.runtime.device import autocast

log = logging.getLogger("nanogpt.batching")

# Why a generation ended. LENGTH and STOP are OpenAI's finish_reason values.
LENGTH, STOP, CANCELLED, ABORTED, FAILED = "length", "stop", "cancelled", "aborted", "failed"


def move_row(decoder: Decoder, source: int, target: int) -> None:
    """Copy row source of decoder's cache into row target: the busy rows are packed as requests leave."""
    cache = decoder.cache
    for buffer in (cache.keys, cache.values):
        buffer[:, target] = buffer[:, source]
    cache.lengths[target] = cache.lengths[source]
    decoder.held[target] = decoder.held[source]


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

    def __init__(self, prompt_ids: Sequence[int], sampling: Sampling | None = None,
                 stop_ids: Sequence[int] = (), top_logprobs: int | None = None,
                 on_token: Callable[[int, TokenLogprobs | None], bool | None] | None = None,
                 on_finish: Callable[[str], None] | None = None):
        if not prompt_ids:
            raise ValueError("a generation needs at least one prompt token to continue")
        self.ids = list(prompt_ids)  # the prompt, then each new token
        self.prompt_length = len(self.ids)
        self.sampling = sampling or Sampling()  # its stop strings are the listener's: only it sees text
        self.stop_ids, self.top_logprobs = frozenset(stop_ids), top_logprobs
        self.on_token, self.on_finish = on_token, on_finish
        self.generator: torch.Generator | None = None  # made on the engine's device when it joins
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
    """A model's Decoder of `slots` rows and the thread that decodes every active generation together.

    submit() and cancel() may be called from any thread; so may call(), which
    runs a function in the engine's thread between two steps (the server scores
    prompts that way, so the model is only ever used by one thread). Generations
    beyond the slots wait their turn, first come first served.
    """

    def __init__(self, lm: LanguageModel, slots: int):
        self.slots, self.device, self.dtype = slots, lm.device, lm.dtype
        with autocast(lm.device, lm.dtype):
            self.decoder = lm.decoder(slots)  # the compiled step's, where device.compile asks for one
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

    def generate(self, prompt_ids: Sequence[int], sampling: Sampling | None = None,
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Each new token as it is sampled, for a caller in another thread; closing the iterator cancels."""
        tokens: queue.Queue = queue.Queue()

        def heard(token: int, _) -> None:
            if token not in stop_ids:  # a stop token ends the generation unseen
                tokens.put(token)

        generation = Generation(prompt_ids, sampling, stop_ids, on_token=heard,
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
                        self.join(generation)
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

    def join(self, generation: Generation) -> None:
        """Give generation the next free row: it is filled from its prompt at the next step."""
        generation.generator = generation.sampling.generator(self.device)
        self.decoder.held[len(self.rows)] = 0
        self.rows.append(generation)

    @torch.no_grad()
    def step(self) -> None:
        """One token for every row: the Decoder steps the rows in step, fills those new or full."""
        self.pack_to_end([g for row, g in enumerate(self.rows) if self.decoder.fills(row)])
        with autocast(self.device, self.dtype):
            logits = self.decoder.next_logits([g.ids for g in self.rows])
            ended = [g for g, row in zip(self.rows, logits, strict=True) if self.advance(g, row[None])]
        self.release(ended)

    def advance(self, generation: Generation, logits: torch.Tensor) -> bool:
        """Sample generation's next token from its logits (1, vocab), pass it on; True when it has ended."""
        token = int(generation.sampling.next_token(logits, generation.generator))
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
        elif generation.new_tokens >= generation.sampling.max_new_tokens:
            generation.finish(LENGTH)
        return generation.finish_reason is not None

    def pack_to_end(self, moving: list[Generation]) -> None:
        """Put the generations `moving` in the last rows, the others in the first, moving few rows."""
        first = len(self.rows) - len(moving)
        to_end = {id(g) for g in moving}
        holes = [r for r in range(first) if id(self.rows[r]) in to_end]
        movers = [r for r in range(first, len(self.rows)) if id(self.rows[r]) not in to_end]
        for hole, mover in zip(holes, movers, strict=True):
            # The generation in `hole` is about to be filled again: its keys need not be kept,
            # only whether it fills from its prompt (new) or from its newest half window (full).
            filling = self.decoder.held[hole]
            move_row(self.decoder, mover, hole)
            self.decoder.held[mover] = filling
            self.rows[hole], self.rows[mover] = self.rows[mover], self.rows[hole]

    def release(self, leaving: list[Generation]) -> None:
        """Free the rows of leaving: the last busy row moves into each, so busy rows stay packed."""
        for generation in leaving:
            row = next(r for r, g in enumerate(self.rows) if g is generation)
            last = len(self.rows) - 1
            if row != last:
                move_row(self.decoder, last, row)
                self.rows[row] = self.rows[last]
            self.rows.pop()
