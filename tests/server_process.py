"""A real ``python -m nanogpt.serve`` in a child process, on a free loopback port, for the server's tests.

The server prints its address on stderr once its socket is bound (port=0 takes
a free one); the tests wait for /health, talk to it over 127.0.0.1 only, and
stop it with SIGTERM, as a user or a service manager would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

# The address it prints; one listening on every network (host=0.0.0.0) is reached over loopback too.
ADDRESS = re.compile(r" at http://(?:127\.0\.0\.1|0\.0\.0\.0):(\d+):")


class ServerProcess:
    """``python -m nanogpt.serve ARGS`` running in cwd; url once it answers /health."""

    def __init__(self, *args: str, cwd: Path, env: dict | None = None, startup_s: float = 180):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("HYDRA_FULL_ERROR", None)
        # One thread: the tests' own process and the server share the cores, and torch's threads
        # wait for each other badly when cores are scarce.
        command = [sys.executable, "-m", "nanogpt.serve", "port=0", "device=cpu", "device.threads=1", *args]
        self.process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.stderr_lines: list[str] = []
        self.address = threading.Event()
        self.url = ""
        threading.Thread(target=self.read_stderr, daemon=True).start()
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # uvicorn's access log
        deadline = time.monotonic() + startup_s
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.stderr_lines))
            time.sleep(0.1)

    def read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line)
            if (found := ADDRESS.search(line)) and not self.url:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                self.address.set()

    def ready(self) -> bool:
        if not self.url:
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def wait_until_idle(self, timeout_s: float = 60) -> dict:
        """/health once no row is busy and nothing waits (a hang guard, not a speed check)."""
        deadline = time.monotonic() + timeout_s
        while (health := self.health())["busy"] or health["waiting"]:
            assert time.monotonic() < deadline, f"the server stayed busy: {health}"
            time.sleep(0.02)
        return health

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then its exit status (killed, and a failure, if it outlives timeout_s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                message = f"the server outlived SIGTERM by {timeout_s} s:\n{self.stderr}"
                raise AssertionError(message) from None
        return self.process.returncode
