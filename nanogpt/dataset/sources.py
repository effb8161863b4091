"""Where a dataset comes from: one Source class per ``dataset.loader``, each preparing its own kind.

prepare_dataset (nanogpt/dataset/pipeline.py) holds the cache's lock and asks a
Source two things: what identifies its content (fingerprint, to tell whether a
prepared cache is current) and to write train.bin and val.bin into a staging
folder inside the cache folder, whose files replace the cache's once all are
written (prepare). pipeline.py's SOURCES names the class of each ``dataset.loader``:

* TextSource (``text``): a URL, a text file, or a folder of ``.txt`` files, joined
  in sorted order into ``input.txt``; the first 90% of its characters train.
* DocumentSource (``hf``, and ``text`` given .jsonl/.json/.parquet files): a
  corpus of documents read by Hugging Face ``datasets``; the last 10% validate.
* BinSource (``bin``): karpathy/nanoGPT's own train.bin/val.bin, taken as they are.

Text and documents are cut into pieces that worker processes scan and encode
(nanogpt/dataset/workers.py). ``datasets`` is optional and imported where first used.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanogpt.dataset.config import DOCUMENT_BUILDERS, DatasetConfig, is_document_corpus
from nanogpt.dataset.download import copy_and_hash, download, is_url
from nanogpt.dataset.workers import (
    encode_task,
    scan_task,
    workers,
    write_tokens,
    write_tokens_in_place,
)
from nanogpt.errors import DataError, require_package
from nanogpt.fileio import sha256_of_file, write_atomically
from nanogpt.text.nanogpt_meta import read_char_vocabulary
from nanogpt.text.tokenizers import CLEAN_CUT as CLEAN_CUT_TEXT
from nanogpt.text.tokenizers import Tokenizer, load_tokenizer, train_bpe

CHUNK_BYTES = 4 << 20  # a piece of text per task: large enough to amortise, small enough for memory
CUT_WINDOW = 1 << 16  # how far past a nominal chunk end to look for a clean place to cut
DOCUMENTS_PER_TASK = 1024
# tokenizer.CLEAN_CUT for bytes: where a piece of text may end without changing any ids.
CLEAN_CUT = re.compile(CLEAN_CUT_TEXT.pattern.encode())


class Source(ABC):
    """One kind of dataset source: what a ``dataset.loader`` reads and how it becomes token files."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: DatasetConfig) -> Source:
        """The source a dataset config describes."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """What identifies the content: a prepared cache is current while this is unchanged."""

    def encoding_tokenizer(self, config: DatasetConfig, named: Tokenizer | None,
                           model: Tokenizer | None) -> Tokenizer | None:
        """The tokenizer to encode with: named (dataset.tokenizer's, None where the data decides).

        model is the tokenizer of the model the data is prepared for (model.init_from's), for a
        source that must encode with it (sft); the others leave the check to the trainer.
        """
        return named

    @abstractmethod
    def prepare(self, config: DatasetConfig, directory: Path, tokenizer: Tokenizer | None,
                processes: int) -> dict:
        """Write train.bin and val.bin into directory; return what meta.json records of them.

        directory is an empty staging folder inside the cache folder; what is
        written there replaces the cache's files once the preparation succeeds.
        A download worth keeping across preparations goes in directory.parent.

        tokenizer is the named tokenizer, or None where the data decides it
        (char: the text's characters; bpe: trained on the train split). The
        result holds at least tokenizer (its description), vocab_size, dtype and
        <split>_tokens.
        """


def stamp(files: list[Path]) -> list[list]:
    """Local files by their path, size and modification time: what a fingerprint keeps of them."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def local_files(source: str, suffix: str, what_works: str) -> list[Path]:
    """The file source names, or the files ending in suffix in the folder it names (sorted, recursively)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob(f"*{suffix}"))
        if not files:
            raise DataError(f"dataset.source {path} is a directory with no {suffix} files in it")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"dataset.source {path} does not exist; {what_works}")


# --- text ------------------------------------------------------------------------------------


@dataclass
class TextSource(Source):
    """Plain text: a URL, a file, or a folder whose ``*.txt`` files are joined in sorted order."""

    source: str
    sha256: str | None = None

    @classmethod
    def from_config(cls, config: DatasetConfig) -> Source:
        """A text source, or the document corpus that .jsonl/.json/.parquet files are."""
        if is_document_corpus(config.source):
            return DocumentSource.from_config(config)
        return cls(config.source, config.sha256)

    def files(self) -> list[Path]:
        """The local files making up the text, in the order they are joined."""
        return local_files(self.source, ".txt", "give a URL, a text file or a directory of .txt files")

    def fingerprint(self) -> dict:
        """A URL is trusted to keep its content (or its sha256 says so); a file is known by its stat."""
        if is_url(self.source):
            return {"url": self.source, "sha256": self.sha256}
        return {"files": stamp(self.files()), "sha256": self.sha256}

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

    def prepare(self, config: DatasetConfig, directory: Path, tokenizer: Tokenizer | None,
                processes: int) -> dict:
        """The first (1 - val_fraction) of the text's characters train, the rest validate."""
        raw = directory / "input.txt"
        made: dict = {"source_sha256": self.fetch(raw)}
        reader = TextReader(raw, self)
        pieces = text_ranges(raw)
        with workers(reader, None, processes) as run:
            scanned = list(run(scan_task, pieces, f"scan {config.name}"))
        made["characters"] = sum(count for count, _ in scanned)
        if made["characters"] == 0:
            raise DataError(f"dataset.source {config.source} is empty; give it some text")
        splits, piece_chars = split_text(reader, pieces, [count for count, _ in scanned],
                                         int(made["characters"] * (1 - config.val_fraction)))
        return {**made, **encode_splits(config, directory, reader, splits, tokenizer, processes,
                                        scanned, piece_chars)}


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


def split_text(reader: TextReader, pieces: list[tuple[int, int]], counts: list[int],
               n_train: int) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[int]]]:
    """Byte ranges for train (the first n_train characters) and val (the rest), and their characters.

    Only the piece holding the split point is read again, to find the byte
    where character n_train starts.
    """
    before = 0
    for i, ((start, end), count) in enumerate(zip(pieces, counts, strict=True)):
        if before + count >= n_train:
            text = reader.texts((start, end))[0]
            cut = start + len(text[: n_train - before].encode("utf-8"))
            head, tail = n_train - before, count - (n_train - before)
            splits = {"train": pieces[:i] + [(start, cut)], "val": [(cut, end)] + pieces[i + 1:]}
            chars = {"train": counts[:i] + [head], "val": [tail] + counts[i + 1:]}
            return ({split: [p for p, c in zip(splits[split], chars[split], strict=True) if c]
                     for split in splits},
                    {split: [c for c in chars[split] if c] for split in chars})
        before += count
    return {"train": pieces, "val": []}, {"train": counts, "val": []}


@dataclass
class TextReader:
    """Reads byte ranges of input.txt as text."""

    path: Path
    source: TextSource
    documents = False  # one running text: no end-of-text ids between pieces

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


# --- documents --------------------------------------------------------------------------------


@dataclass
class DocumentSource(Source):
    """A corpus of documents: a Hugging Face dataset name, or .jsonl/.json/.parquet files."""

    source: str  # e.g. "Skylion007/openwebtext", or a file or folder of them
    subset: str | None = None  # the dataset's configuration, e.g. FineWeb's "sample-10BT"
    text_field: str = "text"  # the column holding each document's text

    @classmethod
    def from_config(cls, config: DatasetConfig) -> Source:
        return cls(config.source, config.subset, config.text_field)

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
        return {"source": self.source, "subset": self.subset, "text_field": self.text_field,
                "files": None if files is None else stamp(files)}

    def load(self, directory: Path, num_proc: int):
        """Download (or read) the corpus into Arrow files under directory/hf_cache; return the dataset."""
        for module in ("datasets", "pyarrow"):
            require_package(module, "corpus", f"dataset.source={self.source} (a corpus of documents)")
        import datasets

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

    def prepare(self, config: DatasetConfig, directory: Path, tokenizer: Tokenizer | None,
                processes: int) -> dict:
        """The last val_fraction of the documents validate; each ends in the tokenizer's end-of-text."""
        documents = self.load(directory.parent, processes)  # its Arrow cache outlives this preparation
        reader = DocumentReader(documents, config.text_field)
        total = len(documents)
        if total == 0:
            raise DataError(f"dataset.source {config.source} is empty; give it some text")
        n_val = math.ceil(total * config.val_fraction)
        splits = {"train": document_ranges(0, total - n_val), "val": document_ranges(total - n_val, total)}
        scanned = None
        if config.tokenizer == "char":
            with workers(reader, None, processes) as run:
                scanned = list(run(scan_task, splits["train"] + splits["val"], f"scan {config.name}"))
        made = {"documents": {"train": total - n_val, "val": n_val}}
        return {**made, **encode_splits(config, directory, reader, splits, tokenizer, processes, scanned)}


def document_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """Documents start..end-1 in tasks of DOCUMENTS_PER_TASK."""
    return [(i, min(i + DOCUMENTS_PER_TASK, end)) for i in range(start, end, DOCUMENTS_PER_TASK)]


@dataclass
class DocumentReader:
    """Reads ranges of documents from a memory-mapped ``datasets`` corpus."""

    corpus: object  # a datasets.Dataset with one column
    text_field: str
    documents = True  # each text is a document, ended with end-of-text where the tokenizer has one

    def texts(self, task: tuple[int, int]) -> list[str]:
        """The documents start..end-1."""
        start, end = task
        return self.corpus[start:end][self.text_field]


# --- shared: choosing the tokenizer and encoding the splits -----------------------------------


def encode_splits(config: DatasetConfig, directory: Path, reader, splits: dict[str, list],
                  named: Tokenizer | None, processes: int, scanned: list | None = None,
                  piece_chars: dict | None = None) -> dict:
    """Settle the tokenizer, then encode each split's pieces into <split>.bin; what meta.json records.

    scanned holds each piece's (characters, code points) from the char pass;
    piece_chars, where one id per character makes every piece's place known,
    lets the workers write their ids in place.
    """
    if config.tokenizer == "char":
        points = np.unique(np.concatenate([present for _, present in scanned]))
        tokenizer = load_tokenizer({"kind": "char", "vocabulary": [chr(p) for p in points.tolist()]})
    elif config.tokenizer == "bpe":
        training = (text for piece in splits["train"] for text in reader.texts(piece))
        tokenizer = train_bpe(training, config.vocab_size)
    else:
        tokenizer = named
    made = {"tokenizer": tokenizer.description, "vocab_size": tokenizer.vocab_size, "dtype": tokenizer.dtype}
    with workers(reader, tokenizer, processes) as run:
        for split, pieces in splits.items():
            path, desc = directory / f"{split}.bin", f"tokenize {split}"
            if config.tokenizer == "char" and piece_chars is not None:
                made[f"{split}_tokens"] = write_tokens_in_place(path, run, pieces, piece_chars[split],
                                                                np.dtype(tokenizer.dtype), desc)
            else:
                made[f"{split}_tokens"] = write_tokens(path, run(encode_task, pieces, desc))
            if made[f"{split}_tokens"] == 0:
                raise DataError(
                    f"dataset.source {config.source} leaves the {split} split empty; give more text "
                    f"or change dataset.val_fraction={config.val_fraction}")
    return made


# --- nanoGPT's prepared token files -----------------------------------------------------------


@dataclass
class BinSource(Source):
    """A folder of token ids prepared by karpathy/nanoGPT: train.bin, val.bin (uint16), maybe meta.pkl."""

    source: str
    names: tuple[str, ...] = field(default=("train.bin", "val.bin"))

    @classmethod
    def from_config(cls, config: DatasetConfig) -> Source:
        return cls(config.source)

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
        return {"bins": stamp([path / n for n in (*self.names, "meta.pkl") if (path / n).is_file()])}

    def prepare(self, config: DatasetConfig, directory: Path, tokenizer: Tokenizer | None,
                processes: int) -> dict:
        """Take nanoGPT's train.bin/val.bin as they are; the tokenizer comes from meta.pkl or the config.

        A char meta.pkl gives the vocabulary (nanoGPT's ``itos``); otherwise
        dataset.tokenizer names it (gpt2 for nanoGPT's BPE datasets), or
        dataset.vocab_size says how many ids there are when the tokenizer is unknown.
        """
        folder = self.directory()
        if (folder / "meta.pkl").is_file():
            made_with = read_char_vocabulary(folder / "meta.pkl")
        elif config.tokenizer == "char" and config.vocab_size is None:
            raise DataError(f"dataset.source {folder} has no meta.pkl; name its tokenizer "
                            "(dataset.tokenizer=gpt2 for nanoGPT's BPE data) or give dataset.vocab_size")
        elif config.tokenizer == "char":
            made_with = load_tokenizer({"kind": "ids", "vocab_size": config.vocab_size})
        else:
            made_with = tokenizer
        vocab_size = made_with.vocab_size
        made = {"tokenizer": made_with.description, "vocab_size": vocab_size, "dtype": "uint16"}
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            size = path.stat().st_size
            if size == 0 or size % 2:
                raise DataError(f"{path} holds {size} bytes; nanoGPT's .bin files are uint16 ids (an even, "
                                "non-zero number of bytes)")
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            largest = max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, tokens.size, 1 << 24))
            if largest >= vocab_size:
                raise DataError(f"{path} holds id {largest}, beyond the {vocab_size} ids of its tokenizer; "
                                "set dataset.tokenizer (or dataset.vocab_size) to the one it was made with")
            link_or_copy(path, directory / f"{split}.bin")
            made[f"{split}_tokens"] = int(tokens.size)
        return made


def link_or_copy(src: Path, dest: Path) -> None:
    """Put src at dest atomically: a hard link where the file system allows, else a copy."""
    def place(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    write_atomically(dest, place)
