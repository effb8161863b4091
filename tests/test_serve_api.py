"""The server's OpenAI API, judged by the official `openai` package and by raw HTTP, on one server process.

A small random character-level model is served by ``python -m nanogpt.serve``
(one process for the module, on a free loopback port). What a client gets is
compared with what the project's own paths give for the same settings and seed:
``python -m nanogpt.sample`` and LanguageModel.stream for completions,
LanguageModel.chat for chat completions, the model's own log-softmax for
logprobs. Bad input of every kind must be a 4xx with OpenAI's error body.

docs/serving.md's examples (its curl lines, its ```` ```python server ```` client code, its load
command) run against the page's own model in tests/test_doc_commands.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import nanogpt
from nanogpt.benchmarks import serving as load
from nanogpt.model import GPTConfig

from .conftest import run_module
from .server_process import ServerProcess
from .test_load import VOCABULARY, write_our_checkpoint

MODEL = GPTConfig(vocab_size=len(VOCABULARY), block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
NAME = "tiny-char"
LIMIT = 20_000  # the server's max_tokens: far past the block, so a long request can be cut short


def char_run(folder) -> Path:
    """A run directory in folder holding a random 2-layer character model (MODEL)."""
    run = folder / "run"
    write_our_checkpoint(run / "best.pt", MODEL, {"kind": "char", "vocabulary": VOCABULARY})
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return char_run(tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module")
def server(run):
    process = ServerProcess(f"ckpt={run}", f"name={NAME}", f"max_tokens={LIMIT}", "slots=4", "max_n=4",
                            "max_body_kb=64", cwd=run.parent)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def lm(run):
    return nanogpt.load(run, device="cpu")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def streamed_text(chunks) -> tuple[str, list]:
    chunks = list(chunks)
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_the_model_is_listed_and_health_answers(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = server.health()
    assert health["status"] == "ok" and health["model"] == NAME and health["slots"] == 4


def test_a_completion_is_what_nanogpt_sample_prints(client, run):
    """150 tokens from a 64-token block, sampled with top_k: the window slides as the command's does."""
    sample = run_module("nanogpt.sample", f"ckpt={run}", "prompt=ROMEO:", "num_tokens=150", "seed=5",
                        "temperature=0.8", "top_k=40", "device=cpu", cwd=run.parent)
    assert sample.returncode == 0, sample.stderr
    settings = dict(model=NAME, prompt="ROMEO:", max_tokens=150, seed=5, temperature=0.8,
                    extra_body={"top_k": 40})
    whole = client.completions.create(**settings)
    assert "ROMEO:" + whole.choices[0].text + "\n" == sample.stdout
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (6, 150)
    text, chunks = streamed_text(client.completions.create(**settings, stream=True))
    assert text == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampling_settings_reach_the_model(client, lm):
    for temperature, top_p, top_k in ((1.2, 0.9, None), (0.0, None, None), (0.7, 0.5, 3)):
        extra = {"top_k": top_k} if top_k is not None else {"top_k": -1}  # -1: no top-k, as vLLM reads it
        got = client.completions.create(model=NAME, prompt="JULIET:\n", max_tokens=40, seed=9,
                                        temperature=temperature, top_p=top_p, extra_body=extra)
        expected = "".join(lm.stream("JULIET:\n", 40, temperature, top_k, top_p, seed=9))
        assert got.choices[0].text == expected, (temperature, top_p, top_k)


def test_chat_answers_what_lm_chat_answers(client, lm):
    conversation = [{"role": "system", "content": "You speak in verse."},
                    {"role": "user", "content": "Who are you?"},
                    {"role": "assistant", "content": "A player."},
                    {"role": "user", "content": "Say more."}]
    expected = lm.chat(conversation, max_new_tokens=60, temperature=0.9, top_k=30, seed=3)
    answer = client.chat.completions.create(model=NAME, messages=conversation, max_tokens=60, temperature=0.9,
                                            seed=3, extra_body={"top_k": 30})
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=conversation, max_tokens=60,
                                                 temperature=0.9, seed=3, extra_body={"top_k": 30},
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    greedy = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                            max_completion_tokens=30, temperature=0)
    assert greedy.choices[0].message.content == lm.chat("Hello", max_new_tokens=30, temperature=0)


def test_n_choices_are_seeded_one_after_another(client, lm):
    got = client.completions.create(model=NAME, prompt="NURSE:", max_tokens=25, n=3, seed=10, temperature=1.0,
                                    extra_body={"top_k": -1})
    assert [c.index for c in got.choices] == [0, 1, 2]
    for choice in got.choices:
        assert choice.text == "".join(lm.stream("NURSE:", 25, 1.0, None, None, seed=10 + choice.index))
    text, chunks = streamed_text(client.completions.create(model=NAME, prompt=["A", "B"], max_tokens=5, n=2,
                                                           seed=1, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2, 3}  # two prompts, two choices each


def test_a_stop_string_ends_the_text_before_it(client, lm):
    free = "".join(lm.stream("ROMEO:", 60, 0.0, None, None, seed=1))
    stop = free[20:23]
    cut = free[:free.index(stop)]
    got = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=60, temperature=0,
                                    stop=[stop, "@@"])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (cut, "stop")
    text, chunks = streamed_text(client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=60,
                                                           temperature=0, stop=stop, stream=True))
    assert text == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_echo_with_logprobs_gives_the_prompts_log_likelihoods(client, lm):
    """What lm-evaluation-harness's local-completions reads: every prompt token's log-probability."""
    prompt = "ROMEO: But soft, what light"
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=1, echo=True, logprobs=2,
                                    temperature=0)
    choice = choice_of(got)
    ids = lm.encode(prompt)
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([ids]), torch.tensor([ids]))
    table = logits[0].log_softmax(-1)
    lp = choice.logprobs
    assert lp.tokens[:len(ids)] == list(prompt) and len(lp.tokens) == len(ids) + 1
    assert choice.text.startswith(prompt) and len(choice.text) == len(prompt) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(table[i - 1, ids[i]]), abs=1e-4)
        best = table[i - 1].topk(2)
        top = zip(best.indices.tolist(), best.values.tolist(), strict=True)
        assert lp.top_logprobs[i] == pytest.approx({VOCABULARY[t]: float(v) for t, v in top}, abs=1e-4)
    assert lp.text_offset == list(range(len(prompt) + 1))
    only_prompt = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert choice_of(only_prompt).text == prompt and only_prompt.usage.completion_tokens == 0
    assert choice_of(only_prompt).logprobs.token_logprobs == lp.token_logprobs[:len(ids)]


def test_a_generated_tokens_top_logprobs_hold_it_even_when_it_is_not_among_the_likeliest(client):
    """As OpenAI's legacy completions: logprobs=1 at a high temperature often samples another token."""
    for stream in (False, True):
        got = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=40, logprobs=1,
                                        temperature=2.0, seed=3, extra_body={"top_k": 0}, stream=stream)
        parts = [c.choices[0].logprobs for c in got if c.choices and c.choices[0].logprobs] if stream \
            else [got.choices[0].logprobs]
        tokens = [t for part in parts for t in part.tokens]
        tops = [top for part in parts for top in part.top_logprobs]
        logprobs = [lp for part in parts for lp in part.token_logprobs]
        assert len(tokens) == 40
        assert all(token in top and top[token] == pytest.approx(lp) for token, top, lp in
                   zip(tokens, tops, logprobs, strict=True))
        assert any(len(top) == 2 for top in tops)  # sampled below the top 1: both are there
        assert all(1 <= len(top) <= 2 for top in tops)


def test_a_client_that_drops_in_the_middle_of_its_body_is_one_line_in_the_log(server):
    host, port = server.url.removeprefix("http://").split(":")
    before = len(server.stderr_lines)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"ROM")
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while not any("closed the connection" in line for line in server.stderr_lines[before:]):
        assert time.monotonic() < deadline, server.stderr
        time.sleep(0.05)
    assert server.health()["status"] == "ok"  # still serving
    said = [line for line in server.stderr_lines[before:] if not line.startswith("INFO:")]
    assert said == ["POST /v1/completions: the client closed the connection while sending its request\n"]


def choice_of(response):
    assert len(response.choices) == 1
    return response.choices[0]


def post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "ROMEO:", "max_tokens": ', 400, None, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe", 400, None, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, None, "must be a JSON object"),
    ("/v1/completions", b"[" * 30_000 + b"]" * 30_000, 400, None, "nested too deeply"),
    ("/v1/completions", b'{"prompt": "A", "temperature": NaN}', 400, "temperature", "a finite number"),
    ("/v1/completions", {"prompt": "A", "top_k": -5}, 400, "top_k", "or -1 or 0 for no top-k filter"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "prompt is an empty list"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt", "prompt is required"),
    ("/v1/completions", {"prompt": "A", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "A", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/v1/completions", {"prompt": "A", "stream": "yes"}, 400, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": {"text": "A"}}, 400, "prompt", "prompt must be a string, a list of"),
    ("/v1/completions", {"prompt": "A", "colour": "red"}, 400, "colour", "unrecognized request argument"),
    ("/v1/completions", {"prompt": "A", "max_tokens": LIMIT + 1}, 400, "max_tokens", "more than this server"),
    ("/v1/completions", {"prompt": "A", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "A" * 65}, 400, "prompt", "65 tokens, more than the model's context"),
    ("/v1/completions", {"prompt": [3, 99]}, 400, "prompt", "token id 99 is not in the vocabulary (0..64)"),
    ("/v1/completions", {"prompt": "café"}, 400, "prompt", "prompt:"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "prompt is empty"),
    ("/v1/completions", {"prompt": "A", "model": "gpt-4"}, 404, "model", "the model `gpt-4` does not exist"),
    ("/v1/completions", {"prompt": "A", "n": 5}, 400, "n", "at most 4"),
    ("/v1/completions", {"prompt": ["A", "B", "C"], "n": 2}, 400, "n", "6 choices asked for"),
    ("/v1/completions", {"prompt": "A", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "A", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("/v1/completions", {"prompt": "A", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/completions", {"prompt": "A", "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    ("/v1/completions", {"prompt": "A", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 strings"),
    ("/v1/completions", {"prompt": "A", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("/v1/completions", {"prompt": "A", "best_of": 3}, 400, "best_of", "not supported"),
    ("/v1/completions", {"prompt": "A", "suffix": "B"}, 400, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "A", "seed": 2 ** 64}, 400, "seed", "less than"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages",
     "messages.0.role must be one of system, developer, user, assistant, not 'robot'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages",
     "messages.0.content must be a string or a list of"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages", "messages.0.content is"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "x"}]},
     400, "messages", "the last message is the assistant's"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "€"}]}, 400, "messages", "message:"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "tools",
     "unrecognized request argument: tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs", "needs logprobs=true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "x"}, 404, "model",
     "does not exist"),
    ("/v1/completions", {"prompt": "A" * 70_000}, 413, None, "this server takes at most 65,536"),
    ("/v1/completions", b"[" * 40_000 + b"]" * 40_000, 413, None, "this server takes at most 65,536"),
    ("/tokenize", {"text": "A"}, 400, "prompt", "prompt is required"),
    ("/detokenize", {"tokens": [70]}, 400, "tokens", "token id 70 is not in the vocabulary"),
    ("/v1/embeddings", {"input": "A"}, 404, None, "no route POST /v1/embeddings"),
]


@pytest.mark.parametrize("path,body,status,param,message", BAD_REQUESTS,
                         ids=[f"{i}-{b[3] or b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_an_openai_error_body(server, path, body, status, param, message):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error["message"]
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert "Traceback" not in response.text


def test_other_methods_and_the_clients_view_of_errors(server, client):
    response = httpx.get(f"{server.url}/v1/completions")
    assert response.status_code == 405 and "GET is not allowed" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="more than this server allows"):
        client.completions.create(model=NAME, prompt="A", max_tokens=LIMIT + 5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert server.health()["busy"] == 0  # nothing refused took a slot


def test_tokenizer_routes_round_trip(server):
    tokens = post(server, "/tokenize", {"prompt": "ROMEO: hi", "add_special_tokens": False}).json()
    assert tokens["count"] == 9 and tokens["max_model_len"] == 64
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "ROMEO: hi"}
    assert httpx.get(f"{server.url}/tokenizer_info").json()["eos_token"] is None  # characters: no end-of-text


def test_a_client_that_goes_away_frees_its_slot_at_once(server):
    """A stream is read for a while and dropped; a plain request's connection is closed unanswered."""
    before = server.health()["tokens_generated"]
    long = {"model": NAME, "prompt": "ROMEO:", "max_tokens": LIMIT, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json=long) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert server.health()["busy"] == 1
    server.wait_until_idle()

    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        body = json.dumps({"prompt": "JULIET:", "max_tokens": LIMIT}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60  # a hang guard
        while server.health()["busy"] == 0:
            assert time.monotonic() < deadline, "the request never started"
    server.wait_until_idle()
    # Both were cut short: together far fewer tokens than one of them would have made.
    assert server.health()["tokens_generated"] - before < LIMIT // 2


def test_concurrent_greedy_requests_are_neither_lost_nor_mixed_up(server):
    """More clients than slots, many lengths (some past the block): each answer is the one it gets alone."""
    checked = asyncio.run(load.mixups(server.url, None, NAME, requests=24, clients=8, distinct=12))
    assert checked["lost"] == 0, checked["errors"]
    assert checked["mixed_up"] == 0
    assert checked["identical"] + checked["near_tie_differences"] == 24
    assert checked["identical"] >= 20  # near-ties are rare: most answers are exactly the same
