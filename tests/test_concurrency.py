"""Shared data cache under concurrency and interrupted downloads, with real processes and a real server.

Racing and killed downloads are real processes; a download that only fails, or only finishes, runs the
command's main() in the test process (tests/commands.py).
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanogpt.dataset.pipeline import prepare_data

from .commands import run_in_process
from .conftest import REPO
from .test_stops import Running

TEXT = "".join(f"{n}: I speak of {t}.\n" for n in ("ROMEO", "JULIET") for t in ("love", "swords")) * 3000


class TextServer:
    """A loopback HTTP server for one text; it counts GETs and can misbehave on purpose.

    hold_first: the first response waits until `release` is set (so racing clients overlap).
    cut_after: send only this many bytes of the body, then hang (stall=True) or close.
    """

    def __init__(self, text: str, hold_first: bool = False, cut_after: int | None = None,
                 stall: bool = False):
        body = text.encode()
        self.requests = 0
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if hold_first and outer.requests == 1:
                    outer.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if cut_after is None else body[:cut_after])
                self.wfile.flush()
                if cut_after is not None and stall:
                    outer.release.wait(60)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/input.txt"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def prepare_command(url: str, data_root: Path) -> list[str]:
    """The arguments of ``python -m nanogpt.data`` for the served text."""
    return ["dataset=text", "dataset.name=web", f"dataset.source={url}", f"data_root={data_root}"]


def cache_files(directory: Path) -> dict[str, bytes]:
    """Every file of a prepared dataset but its lock file, by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != ".lock"}


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_four_processes_prepare_once_and_agree(tmp_path):
    server = TextServer(TEXT, hold_first=True)
    try:
        root = tmp_path / "shared_root"
        # nanogpt.data, saying when it waits for the folder's lock (tests/lock_waits.py)
        command = [sys.executable, "-m", "tests.lock_waits", *prepare_command(server.url, root)]
        jobs = [Running(command, tmp_path, env={"PYTHONPATH": str(REPO)}) for _ in range(4)]
        # Hold the first download until the three others wait on the lock, so the four
        # really race (the assertions below need no timing).
        waiting = f"waiting for {root / 'web' / '.lock'}"
        deadline = time.monotonic() + 120
        while server.requests < 1 or sum(job.said(waiting) for job in jobs) < 3:
            assert time.monotonic() < deadline, [job.stderr for job in jobs]
            time.sleep(0.05)
        server.release.set()
        outputs = [(job.finish(timeout=300), "\n".join(job.stderr)) for job in jobs]
        assert [job.process.returncode for job in jobs] == [0] * 4, outputs
        assert server.requests == 1  # exactly one process downloaded and prepared; three reused
        assert all("web: " in out for out, _ in outputs)

        single = prepare_data("web", server.url, tmp_path / "single_root")
        assert cache_files(root / "web") == cache_files(single.directory)
        assert not list((root / "web").glob(".*.tmp"))
    finally:
        server.close()


def test_connection_cut_mid_download_leaves_nothing_and_says_so(tmp_path):
    server = TextServer(TEXT, cut_after=len(TEXT) // 2)
    try:
        root = tmp_path / "root"
        result = run_in_process("nanogpt.data", *prepare_command(server.url, root), cwd=tmp_path)
    finally:
        server.close()
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: could not download {server.url}")
    assert "Traceback" not in result.stderr
    assert not root.exists()  # not even the cache folder and its lock: this refused start made them


def test_download_killed_midway_is_never_used_later(tmp_path):
    root = tmp_path / "root"
    stalled = TextServer(TEXT, cut_after=len(TEXT) // 2, stall=True)
    try:
        env = {**os.environ}
        env.pop("HYDRA_FULL_ERROR", None)
        job = subprocess.Popen([sys.executable, "-m", "nanogpt.data", *prepare_command(stalled.url, root)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 0 for p in (root / "web").rglob(".input.txt.*.tmp")):
            if time.monotonic() > deadline or job.poll() is not None:
                job.kill()
                pytest.fail(f"no partial download appeared: {job.communicate()}")
            time.sleep(0.1)
        job.send_signal(signal.SIGKILL)
        job.wait()
    finally:
        stalled.close()
    names = {p.name for p in (root / "web").iterdir()}
    assert not names & {"input.txt", "train.bin", "val.bin", "meta.json"}  # only the temporary file

    good = TextServer(TEXT)
    try:
        result = run_in_process("nanogpt.data", *prepare_command(good.url, root), cwd=tmp_path)
    finally:
        good.close()
    assert result.returncode == 0, result.stderr
    assert (root / "web" / "input.txt").read_text() == TEXT
