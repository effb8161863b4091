"""Where a dataset's text comes from, and the work its preparation splits across processes.

Every source answers the same three questions for the one pipeline in
nanogpt/data.py: what identifies its content (fingerprint, to tell whether a
prepared cache is current), how to bring it local (fetch), and how to read one
piece of it (a Reader, which worker processes use). The sources:

* TextSource: a URL, a text file, or a folder of ``.txt`` files, joined in
  sorted order into ``input.txt``; pieces are byte ranges of that file.
* DocumentSource: ``.jsonl``/``.json``/``.parquet`` files or a Hugging Face
  dataset name, read by ``datasets`` into memory-mapped Arrow files; pieces are
  ranges of documents.
* BinSource: nanoGPT's own ``train.bin``/``val.bin``, already token ids.

The worker functions live here rather than in data.py because data.py imports
torch (for BatchSampler) and a worker process should start in a fraction of a
second. ``datasets`` is optional and imported where first used. Nothing here
imports Hydra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from nanogpt.errors import DataError
from nanogpt.fileio import sha256_of_file, write_atomically
from nanogpt.tokenizer import CLEAN_CUT as CLEAN_CUT_TEXT
from nanogpt.tokenizer import code_points, load_tokenizer

CHUNK_BYTES = 4 << 20  # a piece of text per task: large enough to amortise, small enough for memory
CUT_WINDOW = 1 << 16  # how far past a nominal chunk end to look for a clean place to cut
DOCUMENTS_PER_TASK = 1024
# File extensions of document corpora and the ``datasets`` builder that reads each.
DOCUMENT_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# tokenizer.CLEAN_CUT for bytes: where a piece of text may end without changing any ids.
CLEAN_CUT = re.compile(CLEAN_CUT_TEXT.pattern.encode())


# --- fetching: downloads and local copies ---------------------------------------------------


def is_url(source: str) -> bool:
    """True for an http(s) address, False for a local path."""
    return source.startswith(("http://", "https://"))


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0,
             retries: int = 3) -> Path:
    """Download url to dest with retries, a progress bar and an optional sha256 check.

    The file appears at dest only once it is complete and verified.
    """
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retries are not news; failure is
    session = requests.Session()
    retry = Retry(total=retries, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))

    def fetch(tmp: Path) -> None:
        with session.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with open(tmp, "wb") as f, tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=None
            ) as bar:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        check_sha256(tmp, sha256, url)

    try:
        write_atomically(dest, fetch)
    except requests.RequestException as e:
        raise DataError(
            f"could not download {url} ({describe_request_error(e)}); check the address, or point "
            "dataset.source at a local copy of the file"
        ) from None
    return dest


def describe_request_error(error: requests.RequestException) -> str:
    """A few words on why a request failed."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code}"
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, requests.ConnectionError):
        return "could not connect"
    return type(error).__name__


def check_sha256(path: Path, expected: str | None, source: str, actual: str | None = None) -> None:
    """Raise DataError if path's sha256 differs from expected (None skips the check)."""
    if expected is None:
        return
    actual = actual or sha256_of_file(path)
    if actual != expected:
        raise DataError(
            f"{source} has sha256 {actual}, expected {expected}; the file is not the known "
            "dataset (set dataset.sha256=null to accept a different text)"
        )


def copy_and_hash(files: list[Path], dest: Path, expected: str | None, source: str) -> str:
    """Join files into dest and return the sha256 of the result, reading each byte once.

    dest appears only if the checksum is the expected one (or none is expected).
    """
    digest = hashlib.sha256()

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for file in files:
                with open(file, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        check_sha256(tmp, expected, source, actual=digest.hexdigest())

    write_atomically(dest, join)
    return digest.hexdigest()


# --- sources --------------------------------------------------------------------------------


@dataclass
class TextSource:
    """Plain text: a URL, a file, or a folder whose ``*.txt`` files are joined in sorted order."""

    source: str
    sha256: str | None = None

    def files(self) -> list[Path]:
        """The local files making up the text, in the order they are joined."""
        path = Path(self.source).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise DataError(f"dataset.source {path} is a directory with no .txt files in it")
            return files
        if path.is_file():
            return [path]
        raise DataError(f"dataset.source {path} does not exist; give a URL, a text file or a "
                        "directory of .txt files")

    def fingerprint(self) -> dict:
        """A URL is trusted to keep its content (or its sha256 says so); a file is known by its stat."""
        if is_url(self.source):
            return {"url": self.source, "sha256": self.sha256}
        return {"files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files()],
                "sha256": self.sha256}

    def fetch(self, raw: Path) -> str:
        """Bring the text to the file raw (a URL only if no verified copy is there); return its sha256."""
        if self.sha256 is not None and raw.exists() and sha256_of_file(raw) == self.sha256:
            return self.sha256
        if is_url(self.source):
            download(self.source, raw, self.sha256)
            return sha256_of_file(raw)
        return copy_and_hash(self.files(), raw, self.sha256, self.source)

    def name_at(self, offset: int) -> tuple[str, int]:
        """Which original file holds byte offset of input.txt, and the offset inside it."""
        if is_url(self.source):
            return self.source, offset
        for file in self.files():
            size = file.stat().st_size
            if offset < size:
                return str(file), offset
            offset -= size
        return self.source, offset


def text_ranges(path: Path, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges of about chunk_bytes covering the file, each cut at a clean place.

    A clean cut (see CLEAN_CUT) keeps every tokenizer's ids identical to
    encoding the text whole; where none is near, the cut falls on the next
    character boundary so no UTF-8 character is split.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        position = chunk_bytes
        while position < size:
            f.seek(position)
            window = f.read(CUT_WINDOW)
            found = CLEAN_CUT.search(window)
            if found:
                cut = found.start() + 2
            else:  # the first byte that starts a character
                cut = next((i for i, b in enumerate(window) if b & 0xC0 != 0x80), len(window))
            if position + cut >= size:
                break
            bounds.append(position + cut)
            position = position + cut + chunk_bytes
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


@dataclass
class DocumentSource:
    """A corpus of documents: a Hugging Face dataset name, or .jsonl/.json/.parquet files."""

    source: str  # e.g. "Skylion007/openwebtext", or a file or folder of them
    subset: str | None = None  # the dataset's configuration, e.g. FineWeb's "sample-10BT"
    text_field: str = "text"  # the column holding each document's text

    def local_files(self) -> list[Path] | None:
        """The corpus's files when it is local, None for a Hub dataset."""
        path = Path(self.source).expanduser()
        if not path.exists():
            return None
        return sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())

    def load_arguments(self) -> dict:
        """Keyword arguments for datasets.load_dataset that read this source."""
        files = self.local_files()
        if files is None:
            return {"path": self.source, "name": self.subset}
        corpus = [p for p in files if p.suffix in DOCUMENT_BUILDERS]
        builders = {DOCUMENT_BUILDERS[p.suffix] for p in corpus}
        if len(builders) != 1:
            raise DataError(
                f"dataset.source {self.source} must hold files of one kind among "
                f"{', '.join(DOCUMENT_BUILDERS)}; found {sorted(builders) or 'none'}"
            )
        return {"path": builders.pop(), "data_files": [str(p) for p in corpus]}

    def fingerprint(self) -> dict:
        """A Hub dataset by its name and subset; local files by their stat."""
        files = self.local_files()
        stamp = None if files is None else [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return {"source": self.source, "subset": self.subset, "text_field": self.text_field, "files": stamp}

    def fetch(self, directory: Path, num_proc: int):
        """Download (or read) the corpus into Arrow files under directory/hf_cache; return the dataset."""
        try:
            import datasets
        except ImportError:
            raise DataError(f"dataset.source={self.source} is a document corpus, which needs Hugging "
                            "Face datasets: pip install -e \".[corpus]\"") from None
        arguments = self.load_arguments()
        shards = len(arguments.get("data_files", [])) or num_proc
        try:
            documents = datasets.load_dataset(
                **arguments, split="train", cache_dir=str(directory / "hf_cache"),
                num_proc=min(num_proc, shards) if shards > 1 else None)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"could not load dataset.source={self.source}: {reason}") from None
        if self.text_field not in documents.column_names:
            raise DataError(
                f"dataset.text_field={self.text_field!r} is not a column of {self.source}; "
                f"its columns are: {', '.join(documents.column_names)}"
            )
        return documents.select_columns([self.text_field])


def is_document_corpus(source: str) -> bool:
    """True for a local .jsonl/.json/.parquet file, or a folder holding such files and no .txt."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix in DOCUMENT_BUILDERS
    if path.is_dir():
        suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
        return bool(suffixes & set(DOCUMENT_BUILDERS)) and ".txt" not in suffixes
    return False


@dataclass
class BinSource:
    """A folder of token ids prepared by karpathy/nanoGPT: train.bin, val.bin (uint16), maybe meta.pkl."""

    source: str
    names: tuple[str, ...] = field(default=("train.bin", "val.bin"))

    def directory(self) -> Path:
        """The folder, checked to hold both token files."""
        path = Path(self.source).expanduser()
        if not path.is_dir():
            raise DataError(f"dataset.source {path} is not a directory; dataset.loader=bin reads a folder "
                            "holding train.bin and val.bin")
        for name in self.names:
            if not (path / name).is_file():
                raise DataError(f"dataset.source {path} has no {name}; dataset.loader=bin needs train.bin "
                                "and val.bin (as nanoGPT's prepare.py writes them)")
        return path

    def fingerprint(self) -> dict:
        """The token files and meta.pkl by their stat."""
        path = self.directory()
        files = [path / n for n in (*self.names, "meta.pkl") if (path / n).is_file()]
        return {"bins": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


# --- reading pieces, in worker processes ----------------------------------------------------


@dataclass
class TextReader:
    """Reads byte ranges of input.txt as text."""

    path: Path
    source: TextSource

    def texts(self, task: tuple[int, int]) -> list[str]:
        """The text of one byte range; a byte that is not UTF-8 names its original file."""
        start, end = task
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        try:
            return [data.decode("utf-8")]
        except UnicodeDecodeError as e:
            name, offset = self.source.name_at(start + e.start)
            raise DataError(f"dataset.source {name} is not UTF-8 text (byte {offset} cannot be decoded); "
                            "convert it to UTF-8, e.g. with iconv") from None


@dataclass
class DocumentReader:
    """Reads ranges of documents from a memory-mapped ``datasets`` corpus."""

    documents: object  # a datasets.Dataset with one column
    text_field: str

    def texts(self, task: tuple[int, int]) -> list[str]:
        """The documents start..end-1."""
        start, end = task
        return self.documents[start:end][self.text_field]


_worker: dict = {}  # this process's reader and tokenizer, set once by start_worker


def start_worker(reader, tokenizer_json: str | None) -> None:
    """Pool initializer: keep the reader and build the tokenizer once per process."""
    # A Hugging Face tokenizer would start its own thread pool in every worker; the
    # workers already use every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["reader"] = reader
    _worker["tokenizer"] = load_tokenizer(tokenizer_json) if tokenizer_json else None
    _worker["documents"] = isinstance(reader, DocumentReader)


def start_pool_worker(reader, tokenizer_json: str | None) -> None:
    """Pool initializer: a worker leaves stop signals to the parent, then starts as start_worker does.

    A forked worker inherits the parent's handlers, which turn SIGTERM into an exception: each
    worker would print its own traceback when the parent stops the pool. The parent takes
    Ctrl-C and terminates the pool (SIGTERM, now simply the end of a worker).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    start_worker(reader, tokenizer_json)


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
        ids.tofile(f)
    return int(ids.size)


def description_json(description: dict) -> str:
    """The form a tokenizer description travels to workers in (and load_tokenizer caches by)."""
    return json.dumps(description, sort_keys=True)


def link_or_copy(src: Path, dest: Path) -> None:
    """Put src at dest atomically: a hard link where the file system allows, else a copy."""
    def place(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    write_atomically(dest, place)
