"""How a request becomes generations for the Engine, and how their tokens travel back to the client.

Every request is turned into generations for the Engine (nanogpt/generation/
batching.py), one per choice; their tokens come back from the engine's thread
through an asyncio queue, as text pieces (nanogpt/generation/detokenize.py) and,
when asked for, log-probabilities. respond() sends an answer either as
server-sent events (a chunk per piece and ``data: [DONE]`` last) or as one JSON
body, for both completion routes. A client that goes away cancels its
generations at once, freeing their rows for the next step.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nanogpt.errors import UserError
from nanogpt.generation.batching import ABORTED, FAILED, LENGTH, Engine, Generation, TokenLogprobs
from nanogpt.generation.detokenize import Detokenizer
from nanogpt.generation.language_model import LanguageModel
from nanogpt.generation.sampling import Sampling
from nanogpt.runtime.device import autocast
from nanogpt.serving.config import ServeConfig
from nanogpt.serving.protocol import APIError, SamplingFields, now


class Service:
    """One model behind the routes: its engine, its tokenizer, and the limits requests must keep."""

    def __init__(self, lm: LanguageModel, engine: Engine, config: ServeConfig, name: str):
        self.lm, self.engine, self.config, self.name = lm, engine, config, name
        self.block = lm.model.config.block_size
        self.vocab_size = lm.model.config.vocab_size
        self.eot = lm.tokenizer.eot
        self.max_tokens = config.max_tokens or self.block
        self.seeds = random.Random(config.seed)  # for requests that give no seed
        self.created = now()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.name}`",
                           "model", "model_not_found")

    def check_room(self, body: SamplingFields, max_tokens: int) -> None:
        if max_tokens > self.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is more than this server allows: {self.max_tokens} "
                                f"(the model's context is {self.block} tokens)", "max_tokens")
        if body.choices_asked() > self.config.max_n:
            raise APIError(400, f"{body.choices_asked()} choices asked for (n times the prompts); this "
                                f"server gives at most {self.config.max_n} a request", "n")
        if self.engine.queued >= self.config.queue:
            raise APIError(503, f"the server is busy ({self.engine.queued} requests are waiting for a slot); "
                                "retry in a moment")

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids, checked: known tokens, at least one, no more than the model's context."""
        if isinstance(prompt, str):
            try:
                ids = self.lm.encode(prompt)
            except UserError as error:  # a character the vocabulary lacks
                raise APIError(400, f"prompt: {error}", "prompt") from None
        else:
            ids = list(prompt)
            wrong = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if wrong is not None:
                raise APIError(400, f"prompt: token id {wrong} is not in the vocabulary "
                                    f"(0..{self.vocab_size - 1})", "prompt")
        if not ids:
            if self.eot is None:  # as OpenAI does, an empty prompt starts from the end-of-text token
                raise APIError(400, "prompt is empty; the model needs at least one token to continue",
                               "prompt")
            ids = [self.eot]
        if len(ids) > self.block:
            raise APIError(400, f"prompt: {len(ids)} tokens, more than the model's context of {self.block} "
                                "tokens", "prompt")
        return ids

    def sampling(self, body: SamplingFields, choice: int, max_tokens: int, stops: list[str]) -> Sampling:
        """The request's Sampling (the server's settings where it gives none); choice i is seeded seed + i."""
        c = self.config
        top_k = c.top_k if body.top_k is None else (None if body.top_k <= 0 else body.top_k)
        seed = self.seeds.getrandbits(63) if body.seed is None else body.seed + choice
        return Sampling(c.temperature if body.temperature is None else body.temperature, top_k,
                        c.top_p if body.top_p is None else body.top_p, seed, stops, max_tokens)

    def token_text(self, token: int) -> str:
        return self.lm.decode([token])

    def prompt_logprobs(self, ids: list[int], top: int) -> list[TokenLogprobs | None]:
        """Each prompt token's log-probability given the ones before it (None for the first): echo's logprobs.

        Runs in the engine's thread, so the model is used by one thread only.
        """
        if len(ids) < 2:
            return [None] * len(ids)
        with torch.no_grad(), autocast(self.lm.device, self.lm.dtype):
            idx = torch.tensor([ids], device=self.lm.device)
            positions = torch.arange(len(ids) - 1, device=self.lm.device)
            logits = self.lm.model.logits_at(idx, torch.zeros_like(positions), positions)
        table = logits.float().log_softmax(dim=-1)
        chosen = table.gather(1, torch.tensor(ids[1:], device=table.device)[:, None])[:, 0].tolist()
        best = table.topk(min(top, table.size(-1)))
        rows = zip(chosen, best.indices.tolist(), best.values.tolist(), strict=True)
        return [None] + [TokenLogprobs(lp, list(zip(i, v, strict=True))) for lp, i, v in rows]


@dataclass
class Choice:
    """One generation of a request, heard in the engine's thread and passed to the request's event loop."""

    index: int
    generation: Generation
    detokenizer: Detokenizer
    tokens: list[tuple[int, TokenLogprobs | None]] = field(default_factory=list)
    finish_reason: str | None = None

    def answered_tokens(self) -> list[tuple[int, TokenLogprobs | None]]:
        """The tokens of the answer itself: an end-of-text token that ended it is not one."""
        return [(t, lp) for t, lp in self.tokens if t not in self.generation.stop_ids]


class Answer:
    """A request's choices, and the events (index, text piece, new tokens, finish reason) they send."""

    def __init__(self, service: Service):
        self.service, self.loop = service, asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []

    def add(self, prompt_ids: list[int], sampling: Sampling, stop_ids: list[int], logprobs: int | None,
            skip_prefix: str = "") -> Choice:
        index = len(self.choices)
        detokenizer = Detokenizer(self.service.lm.decode, sampling.stop, skip_prefix)
        generation = Generation(prompt_ids, sampling, stop_ids, logprobs,
                                on_token=lambda token, lp: self.heard(index, token, lp),
                                on_finish=lambda reason: self.ended(index, reason))
        self.choices.append(Choice(index, generation, detokenizer))
        return self.choices[-1]

    def heard(self, index: int, token: int, logprobs: TokenLogprobs | None) -> bool:
        """In the engine's thread: a new token of choice index. True ends it (a stop string was written)."""
        choice = self.choices[index]
        choice.tokens.append((token, logprobs))
        piece = "" if token in choice.generation.stop_ids else choice.detokenizer.add(token)
        if piece or logprobs is not None:
            self.post(index, piece, len(choice.tokens), None)
        return choice.detokenizer.stopped

    def ended(self, index: int, reason: str) -> None:
        rest = self.choices[index].detokenizer.finish() if reason not in (ABORTED, FAILED) else ""
        self.post(index, rest, len(self.choices[index].tokens), reason)

    def post(self, index: int, piece: str, tokens: int, reason: str | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (index, piece, tokens, reason))

    def start(self) -> None:
        for choice in self.choices:
            self.service.engine.submit(choice.generation)

    def cancel(self) -> None:
        for choice in self.choices:
            self.service.engine.cancel(choice.generation)

    def completion_tokens(self) -> int:
        return sum(len(choice.tokens) for choice in self.choices)

    async def events_until_done(self) -> AsyncIterator[tuple[Choice, str, int, str | None]]:
        """(choice, piece, tokens heard so far, finish reason or None) until every choice has finished."""
        running = sum(choice.finish_reason is None for choice in self.choices)
        while running:
            index, piece, tokens, reason = await self.events.get()
            choice = self.choices[index]
            if reason is not None:
                if reason in (ABORTED, FAILED):
                    raise stopped_error(reason)
                choice.finish_reason = "length" if reason == LENGTH else "stop"
                running -= 1
            yield choice, piece, tokens, choice.finish_reason


def stopped_error(reason: str) -> APIError:
    if reason == ABORTED:
        return APIError(503, "the server is shutting down; the request was cancelled")
    return APIError(500, "the model failed while generating (the server's log says why)")


class Reply:
    """What a completion route sends for its Answer: chunks() for a stream, body() for one JSON object.

    headers go with either (what was left out to fit the model's context, for the chat page).
    """

    def __init__(self, answer: Answer, headers: dict[str, str] | None = None):
        self.answer, self.headers = answer, headers or {}

    def chunks(self) -> AsyncIterator[dict]:
        raise NotImplementedError

    def body(self) -> dict:
        raise NotImplementedError


async def respond(request: Request, reply: Reply, stream: bool) -> Response:
    """The reply as server-sent events when the client streams, else as one JSON body once it is done."""
    if stream:
        response = event_stream(reply.answer, reply.chunks)
        response.headers.update(reply.headers)
        return response
    reply.answer.start()
    await answered(request, reply.answer)
    return JSONResponse(reply.body(), headers=reply.headers)


async def until_disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answered(request: Request, answer: Answer) -> None:
    """Wait until every choice of answer has finished; cancel them all if the client goes away first."""
    async def collect() -> None:
        async for _ in answer.events_until_done():
            pass

    collecting = asyncio.ensure_future(collect())
    watching = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait([collecting, watching], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
            answer.cancel()
    if collecting.cancelled() or not collecting.done():  # nobody is left to read the answer
        raise APIError(499, "the client closed the connection before the answer was ready")  # nginx's status
    collecting.result()  # raises what collecting raised: the engine stopped or failed


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def event_stream(answer: Answer, chunks: Callable[[], AsyncIterator[dict]]) -> StreamingResponse:
    """Server-sent events: each chunk, then [DONE]; an error while streaming is sent as an error event."""
    async def events() -> AsyncIterator[str]:
        answer.start()
        try:
            async for chunk in chunks():
                yield sse(chunk)
        except APIError as error:
            yield sse(error.body())
        finally:  # also when the client went away and the response was cancelled
            answer.cancel()
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def legacy_logprobs(service: Service, tokens: list[tuple[int, TokenLogprobs | None]], start: int,
                    sampled_from: int = 0) -> dict:
    """Completions' logprobs object for tokens; start is the first token's offset in the text.

    tokens from sampled_from on were generated: as in OpenAI's legacy completions, each
    one's top_logprobs holds the token itself, also where it is not among the likeliest.
    """
    texts = [service.token_text(token) for token, _ in tokens]
    offsets, at = [], start
    for text in texts:
        offsets.append(at)
        at += len(text)
    tops = []
    for i, (_, lp) in enumerate(tokens):
        top = None if lp is None else {service.token_text(t): v for t, v in lp.top}
        if top is not None and i >= sampled_from:
            top.setdefault(texts[i], lp.logprob)
        tops.append(top)
    return {"tokens": texts, "token_logprobs": [lp.logprob if lp is not None else None for _, lp in tokens],
            "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(service: Service, tokens: list[tuple[int, TokenLogprobs | None]]) -> dict:
    """Chat completions' logprobs object: a list of {token, logprob, bytes, top_logprobs} under content."""
    def entry(token: int, logprob: float) -> dict:
        text = service.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for token, lp in tokens if lp is not None]}
