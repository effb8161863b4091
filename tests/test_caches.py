"""Data caches never collide, with real processes: one folder per source, the exact tokens a run trained on.

A run records which cache it trained on (the folder and its tokens' sha256);
eval and resume read exactly that or refuse in one line, and never prepare a
folder again that holds other data another run may be reading. A preparation
that fails, a disk that fills up included, leaves the cache it was to replace whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.pipeline import prepare_dataset
from nanogpt.weights.checkpoint import load_checkpoint

from .commands import run_in_process
from .conftest import REPO, TINY_RUN, run_module
from .test_concurrency import TextServer
from .test_stops import Running

QUICK = [*TINY_RUN, "sample_tokens=0", "max_iters=2", "eval_interval=2"]
BOOK = "".join(f"{n}: I speak of {t}.\n" for n in ("ROMEO", "JULIET") for t in ("love", "the moon")) * 300
BOOK2 = "".join(f"{n} says {t}!\n" for n in ("MERCUTIO", "NURSE") for t in ("swords", "Verona")) * 300


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a cache folder but the lock, with its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())
            if p.is_file() and p.name != ".lock"}


def one_error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    assert result.returncode == status, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout
    return lines[0]


@pytest.fixture
def books(tmp_path) -> Path:
    """A working directory holding two different books."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "book.txt").write_text(BOOK)
    (work / "book2.txt").write_text(BOOK2)
    return work


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_unnamed_sources_get_own_folders_and_eval_finds_the_run_from_anywhere(books, data_root, tmp_path):
    for name in ("book", "book2"):
        trained = run_in_process("nanogpt.train", *QUICK, "dataset=text", f"dataset.source={name}.txt",
                                 f"data_root={data_root}", f"hydra.run.dir=run_{name}", cwd=books)
        assert trained.returncode == 0, trained.stderr
    folders = sorted(p.name for p in data_root.iterdir())
    assert len(folders) == 2 and folders[0].startswith("text-book-") and folders[1].startswith("text-book2-")

    state = load_checkpoint(books / "run_book" / "last.pt")
    assert state["config"]["dataset"]["source"] == str(books / "book.txt")  # absolute, as given relative
    record = state["data"]
    folder = data_root / record["name"]
    meta = json.loads((folder / "meta.json").read_text())
    assert record["directory"] == str(folder) and meta["source"] == str(books / "book.txt")
    assert record["tokens_sha256"] == meta["tokens_sha256"] == {s: sha256(folder / f"{s}.bin")
                                                                  for s in ("train", "val")}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    scored = run_in_process("nanogpt.eval", f"ckpt={books / 'run_book'}", "device=cpu", cwd=elsewhere)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout.splitlines()[-1])["tokens_file"] == str(folder / "val.bin")

    # A cache that was removed is prepared again from the recorded source, and checked against the record.
    before = sha256(folder / "val.bin")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    again = run_in_process("nanogpt.eval", f"ckpt={books / 'run_book'}", "device=cpu", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert sha256(folder / "val.bin") == before
    # ... unless the source has changed since: then it says so, rather than scoring other text.
    (books / "book.txt").write_text(BOOK.replace("love", "hate"))
    for path in folder.iterdir():
        path.unlink()
    changed = run_in_process("nanogpt.eval", f"ckpt={books / 'run_book'}", "device=cpu", cwd=elsewhere)
    assert "the source has changed since" in one_error_line(changed)


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_named_folder_taken_by_other_data_is_left_alone_by_eval_and_resume(books, data_root):
    shared = ["dataset=text", "dataset.name=shared", f"data_root={data_root}"]
    trained = run_in_process("nanogpt.train", *QUICK, *shared, "dataset.source=book.txt", "hydra.run.dir=run",
                             cwd=books)
    assert trained.returncode == 0, trained.stderr
    other = run_in_process("nanogpt.data", *shared, "dataset.source=book2.txt", cwd=books)  # the same name
    assert other.returncode == 0, other.stderr
    taken = folder_state(data_root / "shared")

    scored = run_in_process("nanogpt.eval", "ckpt=run", "device=cpu", cwd=books)
    resumed = run_in_process("nanogpt.train", "resume=run", "max_iters=4", cwd=books)
    for refused in (scored, resumed):
        line = one_error_line(refused)
        assert f"{data_root / 'shared'} now holds other tokens than this run trained on" in line
        assert f"prepared from {books / 'book2.txt'}" in line and "dataset.name=NEW" in line
    assert folder_state(data_root / "shared") == taken  # not prepared again, not touched

    own = run_in_process("nanogpt.train", "resume=run", "max_iters=4", "dataset.name=book_again", cwd=books)
    assert own.returncode == 0, own.stderr
    assert load_checkpoint(books / "run" / "last.pt")["iter_num"] == 4


def test_a_prepare_of_other_data_into_a_named_folder_waits_for_the_one_before_it(books, data_root):
    server = TextServer(BOOK, hold_first=True)  # the first preparation's download waits for us
    try:
        def start(source: str) -> Running:  # nanogpt.data, saying when it waits for the folder's lock
            return Running([sys.executable, "-m", "tests.lock_waits", "dataset=text", "dataset.name=shared",
                            f"dataset.source={source}", f"data_root={data_root}"], books,
                           env={"PYTHONPATH": str(REPO)})

        first = start(server.url)
        deadline = time.monotonic() + 120
        while server.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = start(str(books / "book2.txt"))
        second.wait_for(f"waiting for {data_root / 'shared' / '.lock'}")
        assert second.process.poll() is None  # waiting on the folder's lock, not writing beside the first
        assert not (data_root / "shared" / "meta.json").exists()
        server.release.set()
        outputs = [(job.finish(timeout=300), "\n".join(job.stderr)) for job in (first, second)]
    finally:
        server.close()
    assert [first.process.returncode, second.process.returncode] == [0, 0], outputs
    for (out, _), text in zip(outputs, (BOOK, BOOK2), strict=True):  # each prepared its own text, whole
        assert out.startswith(f"shared: {int(len(text) * 0.9):,} train and "), out
    meta = json.loads((data_root / "shared" / "meta.json").read_text())
    assert meta["source"] == str(books / "book2.txt") and meta["characters"] == len(BOOK2)


def test_a_reader_keeps_the_tokens_it_opened_while_another_process_replaces_them(books, data_root):
    first = prepare_dataset(DatasetConfig(name="shared", source=str(books / "book.txt")), data_root)
    reading = first.tokens("train")
    opened = np.array(reading[:2000])
    replaced = run_module("nanogpt.data", "dataset=text", "dataset.name=shared",
                          f"dataset.source={books / 'book2.txt'}", f"data_root={data_root}", cwd=books)
    assert replaced.returncode == 0, replaced.stderr
    now = np.fromfile(data_root / "shared" / "train.bin", dtype=first.dtype)
    assert not np.array_equal(now[:2000], opened)  # the folder holds the new preparation
    assert np.array_equal(reading[:2000], opened)  # the reader still reads, whole, what it opened
    assert len(reading) == first.meta["train_tokens"] != len(now)


def test_a_full_disk_while_preparing_leaves_the_previous_cache_whole(books, data_root):
    shared = ["dataset=text", "dataset.name=shared", f"data_root={data_root}"]
    prepared = run_in_process("nanogpt.data", *shared, "dataset.source=book.txt", cwd=books)
    assert prepared.returncode == 0, prepared.stderr
    folder = data_root / "shared"
    before = folder_state(folder)

    full = run_module("tests.faults", "disk_full=val.bin", *QUICK, *shared, "dataset.source=book2.txt",
                      "hydra.run.dir=run", cwd=books)
    line = one_error_line(full, status=1)
    assert line.startswith(f"error: could not prepare {folder}: No space left on device (")
    assert "free there); the cache there is as it was" in line
    assert folder_state(folder) == before and not (folder / ".preparing").exists()
    assert not (books / "run").exists()  # the refused run left no directory
    reused = prepare_dataset(DatasetConfig(name="shared", source=str(books / "book.txt")), data_root)
    assert reused.meta["source"] == str(books / "book.txt") and folder_state(folder) == before


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(books, data_root):
    run_dir = books / "run"
    full = run_module("tests.faults", "disk_full=last.pt@2", *TINY_RUN, "max_iters=20",
                      "eval_interval=5", "dataset=text", "dataset.source=book.txt", f"data_root={data_root}",
                      f"hydra.run.dir={run_dir}", cwd=books)
    line = one_error_line(full, status=1)
    assert line.startswith(f"error: could not write {run_dir / 'last.pt'}: No space left on device (")
    assert "free there); the previous last.pt is unchanged" in line
    saved = load_checkpoint(run_dir / "last.pt")  # whole and loadable: the save before the full disk
    assert saved["iter_num"] == 0 and not list(run_dir.glob(".*.tmp"))
    resumed = run_in_process("nanogpt.train", f"resume={run_dir}", "max_iters=6", cwd=books)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run_dir / "last.pt", weights_only=True)["iter_num"] == 6


def limited(max_file_bytes: int):
    """A preexec_fn: the child may not write any file past max_file_bytes, as a full disk would refuse.

    The kernel then refuses the write itself (EFBIG; Python ignores SIGXFSZ), so what
    is tested is how numpy's and torch's own writers report a refused write.
    """
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    return limit


def run_limited(max_file_bytes: int, module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limited(max_file_bytes))


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_a_write_the_kernel_refuses_is_one_line_for_token_files_and_checkpoints(books, data_root):
    shared = ["dataset=text", "dataset.name=shared", f"data_root={data_root}"]
    prepared = run_in_process("nanogpt.data", *shared, "dataset.source=book.txt", cwd=books)
    assert prepared.returncode == 0, prepared.stderr
    folder = data_root / "shared"
    before = folder_state(folder)
    assert (folder / "train.bin").stat().st_size > 40_000 > (books / "book2.txt").stat().st_size
    refused = run_limited(40_000, "nanogpt.data", *shared, "dataset.source=book2.txt", cwd=books)
    line = one_error_line(refused, status=1)
    assert line.startswith(f"error: could not prepare {folder}: File too large ("), line
    assert folder_state(folder) == before and not (folder / ".preparing").exists()

    run_dir = books / "run"
    trained = run_in_process("nanogpt.train", *QUICK, *shared, "dataset.source=book.txt",
                             f"hydra.run.dir={run_dir}", cwd=books)
    assert trained.returncode == 0, trained.stderr
    last = (run_dir / "last.pt").read_bytes()
    limit = len(last) - 1000  # each save of last.pt is as large as the first
    resumed = run_limited(limit, "nanogpt.train", f"resume={run_dir}", "max_iters=4", cwd=books)
    line = one_error_line(resumed, status=1)
    assert line.startswith(f"error: could not write {run_dir / 'last.pt'}: File too large ("), line
    assert (run_dir / "last.pt").read_bytes() == last and not list(run_dir.glob(".*.tmp"))
