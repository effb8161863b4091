"""The OpenAI API as this server speaks it: request bodies, their checks, and errors.

Request bodies are pydantic models, strict as OpenAI's own API is: a field of
the wrong type (``"max_tokens": "10"``), an unknown field or a value out of
range is a 400 with OpenAI's error body, ``{"error": {"message", "type",
"param", "code"}}``, naming the field. Fields this server cannot honour
(penalties, logit_bias, tools) are accepted only at the values that mean "off",
so a client is never silently given something other than what it asked for.
``top_k`` and ``ignore_eos`` are extra fields, as vLLM takes them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

# OpenAI's limits: at most 4 stop strings, top logprobs 0..5 for completions and 0..20 for chat.
MAX_STOPS, MAX_LOGPROBS, MAX_TOP_LOGPROBS = 4, 5, 20
INT64 = 2 ** 63


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        named = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        self.kind = kind or named.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    """A body whose fields have exactly their declared types, and no others."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    """stream_options: include_usage adds a last chunk with the token counts."""

    include_usage: bool = False


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class SamplingFields(Strict):
    """What completions and chat completions share: the model, sampling, stops, streaming."""

    model: str | None = None
    # A NaN or an infinity is refused as not a number (not as out of range).
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM's extra field; -1 or 0: off, as vLLM reads them
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Field(ge=-INT64, lt=INT64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extra field: go on past the end-of-text token
    user: str | None = None
    # Accepted at their "off" values only (see the module's docstring).
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def choices_asked(self) -> int:
        return self.n


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids (a list of prompts gives choices for each)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def choices_asked(self) -> int:
        return self.n * len(self.prompts())


class TextPart(Strict):
    """A part of a message's content given as a list; only text parts are understood."""

    type: Literal["text"]
    text: str


class Message(Strict):
    """One message of a conversation; a developer message is a system message by OpenAI's newer name."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: dict | None = None

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them (a developer message is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class TokenizeRequest(Strict):
    """POST /tokenize, as vLLM takes it (lm-evaluation-harness's remote tokenizer asks for it)."""

    prompt: str
    add_special_tokens: bool = False
    model: str | None = None


class DetokenizeRequest(Strict):
    """POST /detokenize: token ids back to text."""

    tokens: list[int]
    model: str | None = None


ALTERNATIVES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": f"a string or a list of at most {MAX_STOPS} strings",
    "messages": 'a non-empty list of {"role": "system"|"user"|"assistant", "content": "text"}',
    "content": 'a string or a list of {"type": "text", "text": "..."}',
}


RANGES = {  # what a sampling field may be, in words, for the refusal of any other value
    "temperature": "a number from 0 (the likeliest token) to 2",
    "top_p": "a number in (0, 1]",
    "top_k": "a whole number: at least 1, or -1 or 0 for no top-k filter",
}


def refusal(error: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 that names the field and says what it must be."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    param = location[0] if location else None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {'.'.join(location)}", param)
    if first["type"] == "missing":
        return APIError(400, f"{'.'.join(location)} is required", param)
    named = next((key for key in reversed(location) if key in ALTERNATIVES), None)
    if named == "content":  # inside a message: name which one
        index = location[1] if len(location) > 1 else "?"
        return APIError(400, f"messages.{index}.content must be {ALTERNATIVES['content']}", param)
    if named is not None and first["type"] in ("string_type", "int_type", "list_type", "too_long",
                                               "literal_error", "model_type", "too_short", "dict_type"):
        if named == "messages" and first["type"] == "literal_error":
            return APIError(400, f"messages.{location[1]}.role must be one of system, developer, user, "
                                 f"assistant, not {first['input']!r}", param)
        return APIError(400, f"{named} must be {ALTERNATIVES[named]}", param)
    if param in RANGES and len(location) == 1:
        return APIError(400, f"{param}: {first['msg']}; {param} must be {RANGES[param]}", param)
    if param in ("presence_penalty", "frequency_penalty", "logit_bias"):
        return APIError(400, f"{param} is not supported by this server (only its default, off)", param)
    if param == "suffix":
        return APIError(400, "suffix is not supported by this server (no fill-in-the-middle)", param)
    return APIError(400, f"{'.'.join(location)}: {first['msg']}", param)


async def read_json(request: Request, limit: int) -> object:
    """The request's JSON body, refused past limit bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes; this server takes at most "
                            f"{limit:,}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is over {limit:,} bytes, the most this server takes")
    except ClientDisconnect:  # nobody is left to answer: the route says so in one line of the log
        raise APIError(499, "the client closed the connection while sending its request") from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None


def parse(model: type[Strict], body: object) -> Strict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise refusal(error) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
