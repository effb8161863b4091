"""The server's routes: OpenAI's completions, chat completions and models, a tokenizer, health, the chat page.

Every request is turned into generations for the Engine (nanogpt/generation/
batching.py), one per choice; their tokens come back from the engine's thread
through an asyncio queue, as text pieces (nanogpt/generation/detokenize.py) and,
when asked for, log-probabilities. A streamed answer is sent as server-sent
events, a chunk per piece and ``data: [DONE]`` last; otherwise the pieces are
joined into one JSON body. A client that goes away cancels its generations at
once, freeing their rows for the next step.

Bad input of any kind is a 4xx with OpenAI's error body (protocol.py); only a
bug is a 500, and even then with that body, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nanogpt.errors import UserError
from nanogpt.evaluation.scoring import next_token_logits
from nanogpt.generation.batching import ABORTED, FAILED, LENGTH, Engine, Generation, Sampling, TokenLogprobs
from nanogpt.generation.detokenize import Detokenizer
from nanogpt.generation.language_model import LanguageModel
from nanogpt.runtime.device import autocast
from nanogpt.serving.config import ServeConfig
from nanogpt.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    new_id,
    now,
    parse,
    usage,
)
from nanogpt.text.chat_template import messages_problem
from nanogpt.text.tokenizers import description_json, load_tokenizer

log = logging.getLogger("nanogpt.serving")
PAGE = Path(__file__).with_name("chat.html")
OPEN_PATHS = ("/", "/health")  # reachable without the API key: the page asks for it, a prober needs none


class Service:
    """One model behind the routes: its engine, its tokenizer, and the limits requests must keep."""

    def __init__(self, lm: LanguageModel, engine: Engine, config: ServeConfig, name: str):
        self.lm, self.engine, self.config, self.name = lm, engine, config, name
        self.block = lm.model.config.block_size
        self.vocab_size = lm.model.config.vocab_size
        self.eot = load_tokenizer(description_json(lm.tokenizer)).eot
        self.max_tokens = config.max_tokens or self.block
        self.seeds = random.Random(config.seed)  # for requests that give no seed
        self.created = now()

    # Checks shared by the routes.

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

    def sampling(self, body: SamplingFields, choice: int) -> Sampling:
        """The request's sampling settings (the server's where it gives none); choice i is seeded seed + i."""
        c = self.config
        top_k = c.top_k if body.top_k is None else (None if body.top_k <= 0 else body.top_k)
        seed = self.seeds.getrandbits(63) if body.seed is None else body.seed + choice
        return Sampling(c.temperature if body.temperature is None else body.temperature, top_k,
                        c.top_p if body.top_p is None else body.top_p, seed)

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
            logits = next_token_logits(self.lm.model, idx, torch.zeros_like(positions), positions)
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


class Answer:
    """A request's choices, and the events (index, text piece, new tokens, finish reason) they send."""

    def __init__(self, service: Service):
        self.service, self.loop = service, asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []

    def add(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling, stops: list[str],
            stop_ids: list[int], logprobs: int | None, skip_prefix: str = "") -> Choice:
        index = len(self.choices)
        detokenizer = Detokenizer(self.service.lm.decode, stops, skip_prefix)
        generation = Generation(prompt_ids, max_tokens, sampling, stop_ids, logprobs,
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


async def read_json(request: Request, limit: int) -> object:
    """The request's JSON body, refused past limit bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes; this server takes at most "
                            f"{limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit:,} bytes, the most this server takes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None


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


def legacy_logprobs(service: Service, tokens: list[tuple[int, TokenLogprobs | None]], start: int) -> dict:
    """Completions' logprobs object for tokens; start is the first token's offset in the text."""
    texts = [service.token_text(token) for token, _ in tokens]
    offsets, at = [], start
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [lp.logprob if lp is not None else None for _, lp in tokens],
        "top_logprobs": [None if lp is None else {service.token_text(t): v for t, v in lp.top}
                         for _, lp in tokens],
        "text_offset": offsets,
    }


def chat_logprobs(service: Service, tokens: list[tuple[int, TokenLogprobs | None]]) -> dict:
    """Chat completions' logprobs object: a list of {token, logprob, bytes, top_logprobs} under content."""
    def entry(token: int, logprob: float) -> dict:
        text = service.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for token, lp in tokens if lp is not None]}


class RequireKey:
    """ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer KEY`, else a 401."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: Service) -> FastAPI:
    """The FastAPI application serving service's model."""
    app = FastAPI(title="nanoGPT", docs_url=None, redoc_url=None, openapi_url=None)
    key = service.config.key()
    limit = service.config.max_body_kb * 1024

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                   str(error.detail))
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(APIError(500, "internal server error (the server's log says why)").body(),
                            status_code=500)

    if key is not None:
        app.add_middleware(RequireKey, key=key)

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.name, "slots": service.engine.slots,
                "busy": service.engine.busy, "waiting": service.engine.queued,
                "tokens_generated": service.engine.generated}

    def model_card() -> dict:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "nanogpt",
                "max_model_len": service.block}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        service.check_model(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await read_json(request, limit))
        service.check_model(body.model)
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported by this server (only best_of = n)", "best_of")
        max_tokens = service.max_tokens if body.max_tokens is None else body.max_tokens
        service.check_room(body, max_tokens)
        if not body.prompts():
            raise APIError(400, "prompt is an empty list; give at least one prompt", "prompt")
        prompts = [service.prompt_ids(prompt) for prompt in body.prompts()]
        prompt_texts = [(p if isinstance(p, str) else service.lm.decode(ids)) if body.echo else ""
                        for p, ids in zip(body.prompts(), prompts, strict=True)]
        stop_ids = [] if body.ignore_eos or service.eot is None else [service.eot]
        top = body.logprobs
        echoed: list[list] = [[] for _ in prompts]
        if body.echo and top is not None:
            scoring = [service.engine.call(lambda ids=ids: service.prompt_logprobs(ids, top))
                       for ids in prompts]
            echoed = [list(zip(ids, await asyncio.wrap_future(f), strict=True))
                      for ids, f in zip(prompts, scoring, strict=True)]
        answer = Answer(service)
        for p, ids in enumerate(prompts):
            for i in range(body.n):
                index = p * body.n + i
                answer.add(ids, max_tokens, service.sampling(body, index), body.stops(), stop_ids, top)
        identity = {"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                    "model": service.name}
        prompt_tokens = sum(len(ids) for ids in prompts) * body.n
        if max_tokens == 0:  # only the prompt (echo and logprobs score it); nothing to generate
            answer.choices.clear()

        def prompt_of(index: int) -> int:
            return index // body.n

        if body.stream:
            async def chunks() -> AsyncIterator[dict]:
                def chunk(index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
                    return {**identity, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": reason}]}
                offsets = {}
                for index in range(len(prompts) * body.n):
                    if body.echo:
                        tokens = echoed[prompt_of(index)]
                        yield chunk(index, prompt_texts[prompt_of(index)],
                                    legacy_logprobs(service, tokens, 0) if top is not None else None, None)
                    offsets[index] = len(prompt_texts[prompt_of(index)])
                    if max_tokens == 0:
                        yield chunk(index, "", None, "length")
                sent = {choice.index: 0 for choice in answer.choices}
                async for choice, piece, tokens, reason in answer.events_until_done():
                    logprobs = None
                    if top is not None:
                        logprobs = legacy_logprobs(service, choice.tokens[sent[choice.index]:tokens],
                                                   offsets[choice.index])
                        sent[choice.index] = tokens
                    offsets[choice.index] += len(piece)
                    if piece or logprobs is not None:
                        yield chunk(choice.index, piece, logprobs, None)
                    if reason is not None:
                        yield chunk(choice.index, "", None, reason)
                if body.stream_options is not None and body.stream_options.include_usage:
                    completion = sum(len(choice.tokens) for choice in answer.choices)
                    yield {**identity, "choices": [], "usage": usage(prompt_tokens, completion)}

            return event_stream(answer, chunks)

        answer.start()
        await answered(request, answer)
        choices = []
        for index in range(len(prompts) * body.n):
            text, echo_tokens = prompt_texts[prompt_of(index)], echoed[prompt_of(index)]
            choice = answer.choices[index] if answer.choices else None
            logprobs = None
            if top is not None:
                logprobs = legacy_logprobs(service, echo_tokens + (choice.tokens if choice else []), 0)
            choices.append({"index": index, "text": text + (choice.detokenizer.shown if choice else ""),
                            "logprobs": logprobs,
                            "finish_reason": choice.finish_reason if choice else "length"})
        completion = sum(len(choice.tokens) for choice in answer.choices)
        return JSONResponse({**identity, "choices": choices, "usage": usage(prompt_tokens, completion)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatRequest, await read_json(request, limit))
        service.check_model(body.model)
        if body.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format: only {\"type\": \"text\"} is supported", "response_format")
        max_tokens = body.max_completion_tokens or body.max_tokens or service.max_tokens
        service.check_room(body, max_tokens)
        conversation = body.conversation()
        problem = messages_problem(conversation, for_training=False)
        if problem is not None:
            raise APIError(400, problem, "messages")
        try:
            prompt, fit = service.lm.chat_prompt(conversation, max_tokens)
            max_tokens = fit.room  # as lm.chat: the answer never pushes the prompt out of the block
        except UserError as error:  # a character the vocabulary lacks
            raise APIError(400, str(error), "messages") from None
        template = service.lm.template
        stops = body.stops() + ([template.end_text] if template.end_id is None else [])
        stop_ids = [template.end_id] if template.end_id is not None and not body.ignore_eos else []
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        answer = Answer(service)
        for i in range(body.n):
            answer.add(prompt, max_tokens, service.sampling(body, i), stops, stop_ids, top,
                       template.answer_start)
        identity = {"id": new_id("chatcmpl"), "created": now(), "model": service.name}
        prompt_tokens = len(prompt) * body.n

        def answered_tokens(choice: Choice) -> list:
            return [(t, lp) for t, lp in choice.tokens if t not in choice.generation.stop_ids]

        if body.stream:
            async def chunks() -> AsyncIterator[dict]:
                def chunk(index: int, delta: dict, reason: str | None, logprobs: dict | None = None) -> dict:
                    return {**identity, "object": "chat.completion.chunk",
                            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": reason}]}
                for choice in answer.choices:
                    yield chunk(choice.index, {"role": "assistant", "content": ""}, None)
                sent = {choice.index: 0 for choice in answer.choices}
                async for choice, piece, tokens, reason in answer.events_until_done():
                    logprobs = None
                    if top is not None:
                        new = [(t, lp) for t, lp in choice.tokens[sent[choice.index]:tokens]
                               if t not in choice.generation.stop_ids]
                        logprobs, sent[choice.index] = chat_logprobs(service, new), tokens
                    if piece or (logprobs and logprobs["content"]):
                        yield chunk(choice.index, {"content": piece}, None, logprobs)
                    if reason is not None:
                        yield chunk(choice.index, {}, reason)
                if body.stream_options is not None and body.stream_options.include_usage:
                    completion = sum(len(choice.tokens) for choice in answer.choices)
                    yield {**identity, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage(prompt_tokens, completion)}

            return event_stream(answer, chunks)

        answer.start()
        await answered(request, answer)
        choices = [{"index": choice.index,
                    "message": {"role": "assistant", "content": choice.detokenizer.shown},
                    "logprobs": chat_logprobs(service, answered_tokens(choice)) if top is not None else None,
                    "finish_reason": choice.finish_reason} for choice in answer.choices]
        completion = sum(len(choice.tokens) for choice in answer.choices)
        return JSONResponse({**identity, "object": "chat.completion", "choices": choices,
                             "usage": usage(prompt_tokens, completion)})

    # vLLM's tokenizer routes: lm-evaluation-harness's local-completions finds them and then
    # tokenizes with the model's own tokenizer, whatever it is (characters, tiktoken, tokenizer.json).

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = parse(TokenizeRequest, await read_json(request, limit))
        service.check_model(body.model)
        eot_text = service.token_text(service.eot) if service.eot is not None else None
        if body.prompt == eot_text:  # read as a Hugging Face tokenizer reads its special token
            tokens = [service.eot]
        else:
            try:
                tokens = service.lm.encode(body.prompt)
            except UserError as error:
                raise APIError(400, f"prompt: {error}", "prompt") from None
        return {"count": len(tokens), "max_model_len": service.block, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = parse(DetokenizeRequest, await read_json(request, limit))
        service.check_model(body.model)
        wrong = next((t for t in body.tokens if not 0 <= t < service.vocab_size), None)
        if wrong is not None:
            raise APIError(400, f"tokens: token id {wrong} is not in the vocabulary "
                                f"(0..{service.vocab_size - 1})", "tokens")
        return {"prompt": service.lm.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """What a remote tokenizer client needs: the end-of-text token (lm-eval reads its id by /tokenize)."""
        return {"tokenizer_class": service.lm.tokenizer.get("kind"), "model_max_length": service.block,
                "eos_token": service.token_text(service.eot) if service.eot is not None else None,
                "bos_token": None, "pad_token": None, "chat_template": None}

    return app
