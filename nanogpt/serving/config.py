"""What ``python -m nanogpt.serve`` takes: a model as every command takes one, and how to serve it.

The model, its device and the sampling defaults are SamplingOptions (the same
``ckpt=``, ``quantize=``, ``temperature=`` ... as ``nanogpt.sample``); a request
that leaves a sampling setting out gets the server's. The rest says where it
listens, who may use it, and how much one request may ask for.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from nanogpt.errors import require_package
from nanogpt.generation.inference import SamplingOptions
from nanogpt.options import option, require

API_KEY_VARIABLE = "NANOGPT_API_KEY"


@dataclass
class ServeConfig(SamplingOptions):
    """An OpenAI-compatible server for a checkpoint, with a chat page at /."""

    host: str = option("127.0.0.1", "the address to listen on; 127.0.0.1: this machine only, 0.0.0.0: every "
                                    "network it is on (set api_key then)")
    port: int = option(8000, "the port; 0: any free one (the address is printed)")
    api_key: str | None = option(None, "every request but the page and /health needs `Authorization: "
                                       f"Bearer KEY`; null: the {API_KEY_VARIABLE} environment variable, "
                                       "else no key")
    name: str | None = option(None, "the model's name in /v1/models and in requests; null: ckpt as given")
    slots: int = option(8, "requests decoded together, one KV-cache row each; more wait their turn")
    queue: int = option(64, "requests that may wait for a slot; beyond, a 503 asks the client to retry")
    max_tokens: int | None = option(None, "the most new tokens one request may ask for; null: the model's "
                                          "block_size (past it the window slides, as nanogpt.sample's does)")
    max_n: int = option(8, "the most choices one request may ask for (n, times the prompts of a list)")
    max_body_kb: int = option(1024, "the largest request body, in KiB")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.port <= 65535, f"port={self.port} must be in 0..65535 (0: any free port)")
        for key in ("slots", "queue", "max_n", "max_body_kb"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be at least 1")
        require(self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens={self.max_tokens} must be at least 1, or null for the model's block_size")
        require(self.api_key is None or self.api_key.strip() != "",
                "api_key is empty; give a key, or null for none")

    def require_packages(self) -> None:
        super().require_packages()
        require_package("fastapi", "serve", "nanogpt.serve")
        require_package("uvicorn", "serve", "nanogpt.serve")

    def key(self) -> str | None:
        """The API key in force: api_key, else the environment's, else None (anyone may ask)."""
        return self.api_key or os.environ.get(API_KEY_VARIABLE) or None


def is_loopback(host: str) -> bool:
    """True when host can only be reached from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
