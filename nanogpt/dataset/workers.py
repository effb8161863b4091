"""The work of a preparation, split across processes: a pool of forked workers and what each does.

A corpus is cut into pieces (byte ranges of a text, ranges of documents); each
worker holds the source's reader and the tokenizer, and scans or encodes one
piece per task. Reader objects come from nanogpt/dataset/sources.py and offer
``texts(piece) -> list[str]`` and ``documents`` (True: each text is a document,
ended with the tokenizer's end-of-text id where it has one). Workers are forked,
so they start at once and share the reader (a memory-mapped corpus) without copying it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanogpt.fileio import write_atomically
from nanogpt.text.tokenizers import Tokenizer, code_points, load_tokenizer


@contextmanager
def workers(reader, tokenizer: Tokenizer | None, processes: int) -> Iterator[Callable]:
    """run(function, tasks, desc): function over tasks in order, in `processes` worker processes.

    Workers are forked: they start at once and share the reader (a memory-mapped
    corpus, a file path) without copying it. One process, or one task, runs here.
    A worker is given the tokenizer's description and builds it once (a process
    start method other than fork sends it over a pipe).
    """
    description = tokenizer.description if tokenizer is not None else None
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    # Workers are the parallelism; Hugging Face tokenizers then need no threads of their own
    # (and, told so before the fork, do not warn about it).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = None
    try:
        start_worker(reader, description)  # this process does the work when there is one piece

        def run(function, tasks: list, desc: str) -> Iterator:
            nonlocal pool
            if pool is None and processes > 1 and len(tasks) > 1:
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
                pool = multiprocessing.get_context(method).Pool(
                    processes, initializer=start_pool_worker, initargs=(reader, description))
            parallel = pool is not None and len(tasks) > 1
            results = pool.imap(function, tasks) if parallel else map(function, tasks)
            yield from tqdm(results, total=len(tasks), desc=desc, unit="piece", disable=None)

        yield run
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        stop_worker()  # let go of the reader (a memory-mapped corpus) this process held
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


_worker: dict = {}  # this process's reader and tokenizer, set once by start_worker


def start_worker(reader, description: dict | None) -> None:
    """Pool initializer: keep the reader and build the tokenizer once per process."""
    # A Hugging Face tokenizer would start its own thread pool in every worker; the
    # workers already use every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["reader"] = reader
    _worker["tokenizer"] = load_tokenizer(description) if description is not None else None
    _worker["documents"] = reader.documents


def start_pool_worker(reader, description: dict | None) -> None:
    """Pool initializer: a worker leaves stop signals to the parent, then starts as start_worker does.

    A forked worker inherits the parent's handlers, which turn SIGTERM into an exception: each
    worker would print its own traceback when the parent stops the pool. The parent takes
    Ctrl-C and terminates the pool (SIGTERM, now simply the end of a worker).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    start_worker(reader, description)


def stop_worker() -> None:
    """Forget the reader and tokenizer, so a finished preparation holds no files open."""
    _worker.clear()


def scan_task(task: tuple[int, int]) -> tuple[int, np.ndarray]:
    """(number of characters, sorted distinct code points) of one piece: the char pass."""
    count, present = 0, np.zeros(0, dtype=np.int64)
    for text in _worker["reader"].texts(task):
        count += len(text)
        present = np.union1d(present, np.flatnonzero(np.bincount(code_points(text))))
    return count, present


def encode_task(task: tuple[int, int]) -> np.ndarray:
    """The ids of one piece, in the token files' dtype; documents end in end-of-text where there is one."""
    tokenizer = _worker["tokenizer"]
    pieces = []
    for text in _worker["reader"].texts(task):
        pieces.append(tokenizer.encode_array(text))
        if _worker["documents"] and tokenizer.eot is not None:
            pieces.append(np.array([tokenizer.eot]))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return ids.astype(tokenizer.dtype)


def encode_into_task(task: tuple[int, int, str, int]) -> int:
    """Encode the byte range start..end and write its ids at byte `place` of the file `out`."""
    start, end, out, place = task
    ids = encode_task((start, end))
    with open(out, "r+b") as f:
        f.seek(place)
        write_ids(f, ids)
    return int(ids.size)


def write_ids(f, ids: np.ndarray) -> None:
    """Write ids' bytes to the open file f.

    Not ndarray.tofile: a file system that refuses the bytes (full, over quota)
    makes it raise an OSError without the errno that says so.
    """
    f.write(memoryview(np.ascontiguousarray(ids)).cast("B"))


def write_tokens(path: Path, arrays: Iterable[np.ndarray]) -> int:
    """Append arrays of ids to path in order (atomically); return how many were written."""
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "wb") as f:
            for ids in arrays:
                write_ids(f, ids)
                written += ids.size

    write_atomically(path, write)
    return written


def write_tokens_in_place(path: Path, run: Callable, pieces: list[tuple[int, int]], counts: list[int],
                          dtype: np.dtype, desc: str) -> int:
    """Let the workers write each piece's ids at its own place in path; return how many there are.

    One id per character makes every piece's place known from the scan, so the
    ids need not travel back through a pipe to be written by this process (for
    400 MB of text that is 800 MB less to copy between processes).
    """
    total = sum(counts)
    places = np.cumsum([0, *counts[:-1]]) * dtype.itemsize

    def fill(tmp: Path) -> None:
        os.truncate(tmp, total * dtype.itemsize)
        tasks = [(start, end, str(tmp), int(place))
                 for (start, end), place in zip(pieces, places, strict=True)]
        written = list(run(encode_into_task, tasks, desc))
        if written != counts:  # a bug, not a user error: the scan and the encoding disagree
            raise RuntimeError(f"pieces of {path.name} gave {sum(written)} ids for {total} characters")

    write_atomically(path, fill)
    return total
