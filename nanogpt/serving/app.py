"""The server's routes: OpenAI's completions, chat completions and models, a tokenizer, health, the chat page.

Each route is a function of the request; the model it serves is the app's
Service (answers.py), which turns a request into generations for the Engine and
sends them back, streamed or whole (answers.respond). Bad input of any kind is a
4xx with OpenAI's error body (protocol.py); only a bug is a 500, and even then
with that body, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from nanogpt.errors import UserError
from nanogpt.generation.language_model import ChatFit
from nanogpt.serving.answers import Answer, Reply, Service, chat_logprobs, legacy_logprobs, respond
from nanogpt.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    new_id,
    now,
    parse,
    read_json,
    usage,
)
from nanogpt.text.chat_template import messages_problem

log = logging.getLogger("nanogpt.serving")
PAGE = Path(__file__).with_name("chat.html")
OPEN_PATHS = ("/", "/health")  # reachable without the API key: the page asks for it, a prober needs none


def create_app(service: Service) -> FastAPI:
    """The FastAPI application serving service's model."""
    app = FastAPI(title="nanoGPT", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, bug)
    if service.config.key() is not None:
        app.add_middleware(RequireKey, key=service.config.key())
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    # vLLM's tokenizer routes: lm-evaluation-harness's local-completions finds them and then
    # tokenizes with the model's own tokenizer, whatever it is (characters, tiktoken, tokenizer.json).
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"])
    return app


def service_of(request: Request) -> Service:
    return request.app.state.service


async def body_of(request: Request, schema: type) -> object:
    """The request's JSON body read (within the server's limit) and checked against schema."""
    return parse(schema, await read_json(request, service_of(request).config.max_body_kb * 1024))


# Errors: OpenAI's body, whatever went wrong.

async def api_error(request: Request, error: APIError) -> JSONResponse:
    if error.status == 499:  # the client went away (nginx's status): one line, nobody reads the body
        log.warning("%s %s: %s", request.method, request.url.path, error.message)
    return JSONResponse(error.body(), status_code=error.status)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                               str(error.detail))
    return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)


async def bug(request: Request, error: Exception) -> JSONResponse:
    log.exception("request %s %s failed", request.method, request.url.path)
    return JSONResponse(APIError(500, "internal server error (the server's log says why)").body(),
                        status_code=500)


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


# The page, health and the model list.

async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


async def health(request: Request) -> dict:
    service = service_of(request)
    engine = service.engine
    return {"status": "ok", "model": service.name, "slots": engine.slots, "busy": engine.busy,
            "waiting": engine.queued, "tokens_generated": engine.generated}


def model_card(service: Service) -> dict:
    return {"id": service.name, "object": "model", "created": service.created, "owned_by": "nanogpt",
            "max_model_len": service.block}


async def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(service_of(request))]}


async def model(request: Request, model: str) -> dict:
    service_of(request).check_model(model)
    return model_card(service_of(request))


# Completions.

async def completions(request: Request) -> Response:
    service = service_of(request)
    body = await body_of(request, CompletionRequest)
    service.check_model(body.model)
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of is not supported by this server (only best_of = n)", "best_of")
    max_tokens = service.max_tokens if body.max_tokens is None else body.max_tokens
    service.check_room(body, max_tokens)
    if not body.prompts():
        raise APIError(400, "prompt is an empty list; give at least one prompt", "prompt")
    prompts = [service.prompt_ids(prompt) for prompt in body.prompts()]
    echoed: list[list] = [[] for _ in prompts]  # each prompt's (token, logprobs), when echoed with them
    if body.echo and body.logprobs is not None:
        scoring = [service.engine.call(lambda ids=ids: service.prompt_logprobs(ids, body.logprobs))
                   for ids in prompts]
        echoed = [list(zip(ids, await asyncio.wrap_future(f), strict=True))
                  for ids, f in zip(prompts, scoring, strict=True)]
    answer = Answer(service)
    stop_ids = [] if body.ignore_eos or service.eot is None else [service.eot]
    if max_tokens > 0:  # else only the prompt (echo and logprobs score it): nothing to generate
        for index in range(len(prompts) * body.n):
            answer.add(prompts[index // body.n], service.sampling(body, index, max_tokens, body.stops()),
                       stop_ids, body.logprobs)
    return await respond(request, CompletionReply(answer, body, prompts, echoed), body.stream)


class CompletionReply(Reply):
    """A completions answer: each choice's text (after the prompt, when echoed) and legacy logprobs."""

    def __init__(self, answer: Answer, body: CompletionRequest, prompts: list[list[int]], echoed: list[list]):
        super().__init__(answer)
        self.request, self.prompts, self.echoed, self.service = body, prompts, echoed, answer.service
        decode = self.service.lm.decode
        self.prompt_texts = [(p if isinstance(p, str) else decode(ids)) if body.echo else ""
                             for p, ids in zip(body.prompts(), prompts, strict=True)]
        self.identity = {"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                         "model": self.service.name}
        self.prompt_tokens = sum(len(ids) for ids in prompts) * body.n

    def choice(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def logprobs(self, tokens: list, start: int, sampled_from: int = 0) -> dict | None:
        return None if self.request.logprobs is None else legacy_logprobs(self.service, tokens, start,
                                                                        sampled_from)

    async def chunks(self) -> AsyncIterator[dict]:
        offsets = {}
        for index in range(len(self.prompts) * self.request.n):
            prompt = index // self.request.n
            if self.request.echo:
                echoed = self.logprobs(self.echoed[prompt], 0, sampled_from=len(self.echoed[prompt]))
                yield self.chunk(index, self.prompt_texts[prompt], echoed, None)
            offsets[index] = len(self.prompt_texts[prompt])
            if not self.answer.choices:
                yield self.chunk(index, "", None, "length")
        sent = {choice.index: 0 for choice in self.answer.choices}
        async for choice, piece, tokens, reason in self.answer.events_until_done():
            logprobs = self.logprobs(choice.tokens[sent[choice.index]:tokens], offsets[choice.index])
            sent[choice.index] = tokens
            offsets[choice.index] += len(piece)
            if piece or logprobs is not None:
                yield self.chunk(choice.index, piece, logprobs, None)
            if reason is not None:
                yield self.chunk(choice.index, "", None, reason)
        if self.request.stream_options is not None and self.request.stream_options.include_usage:
            yield {**self.identity, "choices": [],
                   "usage": usage(self.prompt_tokens, self.answer.completion_tokens())}

    def chunk(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        return {**self.identity, "choices": [self.choice(index, text, logprobs, reason)]}

    def body(self) -> dict:
        choices = []
        for index in range(len(self.prompts) * self.request.n):
            prompt = index // self.request.n
            choice = self.answer.choices[index] if self.answer.choices else None
            echoed, generated = self.echoed[prompt], choice.tokens if choice else []
            choices.append(self.choice(index, self.prompt_texts[prompt] + (choice.detokenizer.shown if choice
                                                                           else ""),
                                       self.logprobs(echoed + generated, 0, sampled_from=len(echoed)),
                                       choice.finish_reason if choice else "length"))
        return {**self.identity, "choices": choices,
                "usage": usage(self.prompt_tokens, self.answer.completion_tokens())}


# Chat completions.

async def chat_completions(request: Request) -> Response:
    service = service_of(request)
    body = await body_of(request, ChatRequest)
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
    except UserError as error:  # a character the vocabulary lacks
        raise APIError(400, str(error), "messages") from None
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    template = service.lm.template
    stops = body.stops() + ([template.end_text] if template.end_id is None else [])
    stop_ids = [template.end_id] if template.end_id is not None and not body.ignore_eos else []
    answer = Answer(service)
    for i in range(body.n):  # as lm.chat: the answer never pushes the prompt out of the block (fit.room)
        answer.add(prompt, service.sampling(body, i, fit.room, stops), stop_ids,
                   (body.top_logprobs or 0) if body.logprobs else None, template.answer_start)
    return await respond(request, ChatReply(answer, body, len(prompt), context_headers(fit, max_tokens)),
                         body.stream)


def context_headers(fit: ChatFit, asked: int) -> dict[str, str]:
    """How the conversation fitted the model's context (LanguageModel.chat_prompt), for the page to say.

    The oldest messages dropped, the tokens cut from a newest one too long, and the room the
    answer had against what was asked: nothing is left out without a word.
    """
    return {"X-Context-Size": str(fit.block_size), "X-Context-Dropped-Messages": str(fit.dropped),
            "X-Context-Cut-Tokens": str(fit.cut), "X-Answer-Room": str(fit.room),
            "X-Answer-Asked": str(asked)}


class ChatReply(Reply):
    """A chat completions answer: each choice's message and its logprobs, the end-of-text left out."""

    def __init__(self, answer: Answer, body: ChatRequest, prompt_tokens: int, headers: dict[str, str]):
        super().__init__(answer, headers)
        self.request, self.service = body, answer.service
        self.identity = {"id": new_id("chatcmpl"), "created": now(), "model": self.service.name}
        self.prompt_tokens = prompt_tokens * body.n

    def chunk(self, index: int, delta: dict, reason: str | None, logprobs: dict | None = None) -> dict:
        return {**self.identity, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    async def chunks(self) -> AsyncIterator[dict]:
        for choice in self.answer.choices:
            yield self.chunk(choice.index, {"role": "assistant", "content": ""}, None)
        sent = {choice.index: 0 for choice in self.answer.choices}
        async for choice, piece, tokens, reason in self.answer.events_until_done():
            logprobs = None
            if self.request.logprobs:
                new = [(t, lp) for t, lp in choice.tokens[sent[choice.index]:tokens]
                       if t not in choice.generation.stop_ids]
                logprobs, sent[choice.index] = chat_logprobs(self.service, new), tokens
            if piece or (logprobs and logprobs["content"]):
                yield self.chunk(choice.index, {"content": piece}, None, logprobs)
            if reason is not None:
                yield self.chunk(choice.index, {}, reason)
        if self.request.stream_options is not None and self.request.stream_options.include_usage:
            yield {**self.identity, "object": "chat.completion.chunk", "choices": [],
                   "usage": usage(self.prompt_tokens, self.answer.completion_tokens())}

    def body(self) -> dict:
        choices = [{"index": choice.index,
                    "message": {"role": "assistant", "content": choice.detokenizer.shown},
                    "logprobs": chat_logprobs(self.service, choice.answered_tokens()) if self.request.logprobs
                    else None,
                    "finish_reason": choice.finish_reason} for choice in self.answer.choices]
        return {**self.identity, "object": "chat.completion", "choices": choices,
                "usage": usage(self.prompt_tokens, self.answer.completion_tokens())}


# The tokenizer.

async def tokenize(request: Request) -> dict:
    service = service_of(request)
    body = await body_of(request, TokenizeRequest)
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


async def detokenize(request: Request) -> dict:
    service = service_of(request)
    body = await body_of(request, DetokenizeRequest)
    service.check_model(body.model)
    wrong = next((t for t in body.tokens if not 0 <= t < service.vocab_size), None)
    if wrong is not None:
        raise APIError(400, f"tokens: token id {wrong} is not in the vocabulary "
                            f"(0..{service.vocab_size - 1})", "tokens")
    return {"prompt": service.lm.decode(body.tokens)}


async def tokenizer_info(request: Request) -> dict:
    """What a remote tokenizer client needs: the end-of-text token (lm-eval reads its id by /tokenize)."""
    service = service_of(request)
    return {"tokenizer_class": service.lm.tokenizer.kind, "model_max_length": service.block,
            "eos_token": service.token_text(service.eot) if service.eot is not None else None,
            "bos_token": None, "pad_token": None, "chat_template": None}
