"""Running the server: the model and its engine, a socket, uvicorn, and a prompt exit on SIGTERM.

The socket is bound before the model is loaded, so a port in use is one line at
once, and ``port=0`` takes any free port (the address is printed). A stop
signal (SIGTERM, Ctrl-C) stops the engine first: every request still being
generated ends at once (a streamed one with an error event, then ``[DONE]``),
its connection closes, and uvicorn, which waits for open connections, exits
promptly instead of waiting for answers nobody will read.
"""

from __future__ import annotations

import errno
import signal
import socket
import sys

import uvicorn

from nanogpt.errors import ConfigError
from nanogpt.generation.batching import Engine
from nanogpt.generation.inference import open_model
from nanogpt.serving.answers import Service
from nanogpt.serving.app import create_app
from nanogpt.serving.config import API_KEY_VARIABLE, ServeConfig, is_loopback

GRACE_SECONDS = 5  # after a stop signal, the longest uvicorn waits for connections to close


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, or one line saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(f"port={port} is in use on {host}; choose another port, or port=0 for any free "
                              "one") from None
        raise ConfigError(f"host={host} port={port} cannot be listened on ({error.strerror or error}); "
                          "host=127.0.0.1 is this machine alone, 0.0.0.0 every network it is on") from None
    return sock


def exposure_warning(config: ServeConfig) -> str | None:
    """What to say before listening beyond this machine without an API key, else None."""
    if is_loopback(config.host) or config.key() is not None:
        return None
    return (f"warning: serving on {config.host} without an API key: anyone who can reach this machine may "
            f"use the model; set api_key=... (or {API_KEY_VARIABLE})")


class StoppingServer(uvicorn.Server):
    """uvicorn's server, which on a stop signal also stops the engine (so open streams end at once).

    A stop signal is this program's normal end: it is not raised again once the
    server has shut down (as uvicorn does), so the process exits 0 and says why.
    A second Ctrl-C stops waiting for connections to close.
    """

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine
        self.stopped_by: signal.Signals | None = None

    def handle_exit(self, sig, frame) -> None:
        self.engine.stop(wait=False)
        self.stopped_by = signal.Signals(sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def serve(config: ServeConfig) -> None:
    """Serve config's model until a stop signal."""
    if (warning := exposure_warning(config)) is not None:
        print(warning, file=sys.stderr, flush=True)
    sock = bind(config.host, config.port)
    key = config.key()
    lm = open_model(config, "serving")
    name = config.name or config.ckpt or str(lm.source.where)
    engine = Engine(lm, config.slots).start()
    app = create_app(Service(lm, engine, config, name))
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving {name} ({lm.model.config.block_size}-token context, {config.slots} slots, {lm.device}) "
          f"at {url}: the chat page at {url}/, OpenAI's API at {url}/v1"
          + (" (Authorization: Bearer KEY)" if key else ""), file=sys.stderr, flush=True)
    server = StoppingServer(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=GRACE_SECONDS,
                                           lifespan="off"), engine)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    if server.stopped_by is not None:
        print(f"stopped by {server.stopped_by.name}: the server has shut down", file=sys.stderr, flush=True)
