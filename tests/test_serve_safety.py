"""The server is safe by default: loopback, an API key when one is set, a warning beyond localhost without
one, one-line errors before any work, and a prompt exit on SIGTERM that ends the streams it held.

One server process (started with its key in the environment, and int8 weights) serves the module; its
last test stops it with SIGTERM while a stream is open.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

import nanogpt
from nanogpt.errors import ConfigError
from nanogpt.serving.config import ServeConfig

from .conftest import run_module
from .server_process import ServerProcess
from .test_serve_api import char_run

KEY = "sesame-0123"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return char_run(tmp_path_factory.mktemp("serve_safety"))


@pytest.fixture(scope="module")
def server(run):
    process = ServerProcess(f"ckpt={run}", "quantize=int8", "max_tokens=100000", cwd=run.parent,
                            env={"NANOGPT_API_KEY": KEY})
    yield process
    process.stop()


def test_it_listens_on_loopback_and_asks_for_the_key(server, run):
    assert server.url.startswith("http://127.0.0.1:")
    assert "Authorization: Bearer KEY" in server.stderr and KEY not in server.stderr
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize")):
            response = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "A"})
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    # The page and the health check need no key: the page asks for it, a prober has none.
    assert httpx.get(f"{server.url}/").status_code == 200
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_the_key_opens_every_route_and_int8_serves_what_int8_samples(server, run):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    name = client.models.list().data[0].id
    assert name == str(run)  # ckpt as given names the model
    got = client.completions.create(model=name, prompt="ROMEO:", max_tokens=30, seed=4, temperature=0.8)
    int8 = nanogpt.load(run, device="cpu", quantize="int8")
    assert got.choices[0].text == "".join(int8.stream("ROMEO:", 30, 0.8, 200, None, seed=4))


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_binding_beyond_localhost_without_a_key_warns(run, tmp_path, monkeypatch):
    from nanogpt.serving.server import exposure_warning

    # 192.0.2.1 is a documentation address no machine has: the bind fails, nothing listens beyond loopback.
    refused = run_module("nanogpt.serve", f"ckpt={run}", "host=192.0.2.1", "port=0", cwd=tmp_path,
                         env={"NANOGPT_API_KEY": ""})
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2, refused.stderr
    assert lines[0].startswith("warning: serving on 192.0.2.1 without an API key: anyone who can reach")
    assert lines[-1].startswith("error: host=192.0.2.1 port=0 cannot be listened on")
    monkeypatch.delenv("NANOGPT_API_KEY", raising=False)
    assert exposure_warning(ServeConfig(host="0.0.0.0")).startswith("warning: serving on 0.0.0.0 without")
    for quiet in (ServeConfig(host="0.0.0.0", api_key="k"), ServeConfig(), ServeConfig(host="localhost"),
                  ServeConfig(host="::1"), ServeConfig(host="127.0.0.2")):
        assert exposure_warning(quiet) is None, quiet.host
    monkeypatch.setenv("NANOGPT_API_KEY", "k")
    assert exposure_warning(ServeConfig(host="0.0.0.0")) is None


def test_refusals_come_before_any_work_in_one_line(server, run, tmp_path):
    port = server.url.rsplit(":", 1)[1]
    busy = run_module("nanogpt.serve", f"ckpt={run}", f"port={port}", cwd=tmp_path)
    assert busy.returncode == 2
    assert busy.stderr.strip() == (f"error: port={port} is in use on 127.0.0.1; choose another port, or "
                                   "port=0 for any free one")
    for settings, message in (({"slots": 0}, "slots=0 must be at least 1"),
                              ({"port": 70000}, "port=70000 must be in 0..65535"),
                              ({"api_key": " "}, "api_key is empty"),
                              ({"max_tokens": 0}, "max_tokens=0 must be at least 1")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            ServeConfig(**settings)  # what the command line's key=value builds, checked the same way
    assert list(tmp_path.iterdir()) == []  # nothing written (a missing fastapi: tests/test_first_hour.py)


def test_help_explains_every_key():
    from nanogpt.cli.entry import register_configs
    from nanogpt.cli.help import help_text
    from nanogpt.options import describe_options

    register_configs("serve", ServeConfig)
    text = help_text("serve", ServeConfig, [], "python -m nanogpt.serve")  # what --help prints
    assert text.startswith("python -m nanogpt.serve")
    for key, _, _, meaning in describe_options(ServeConfig):
        assert meaning and f"  {key}: " in text, key


def test_sigterm_ends_open_streams_and_exits_promptly(server):
    """Last: stops the server. An open stream gets an error event and [DONE]; the exit status is 0."""
    body = {"prompt": "ROMEO:", "max_tokens": 100000, "stream": True}
    events = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    assert server.process.poll() is None
                    assert server.stop(timeout_s=30) == 0  # a hang guard: it exits as soon as streams end
    assert events[-1] == "[DONE]"
    assert "shutting down" in json.loads(events[-2])["error"]["message"]
    assert server.stderr.strip().endswith("stopped by SIGTERM: the server has shut down")
