"""The ``dataset`` options, and the shared cache prepared datasets live in.

Declared once here: DatasetConfig is the ``dataset`` config group's schema, and
the data root's default (``$NANOGPT_DATA_ROOT``, else ``~/.cache/nanogpt``) is
DATA_ROOT, read by every command that prepares or reads a dataset.

A cache folder is ``data_root/<name>``. A dataset given a name (the presets,
or ``dataset.name=book``) uses it, on purpose shared by everything so named; one
without a name (``dataset=text dataset.source=book.txt``) gets a folder named
after its source and settings, ``text-book-1a2b3c4d``, so two different
sources, or one source tokenized two ways, never write the same folder. A local
source is kept as its absolute path, so what a run records of its data means
the same from any directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from nanogpt import options
from nanogpt.dataset.download import is_url
from nanogpt.errors import is_installed, require_package
from nanogpt.text.tokenizers import (
    BYTE_ALPHABET,
    OWN_TOKENIZERS,
    is_tokenizer_file,
    knows_tokenizer,
    tiktoken_names,
)

# dataset.loader: what each reads (pipeline.py's SOURCES holds the class that prepares each).
LOADERS = {
    "text": "text files (or .jsonl/.parquet documents)",
    "hf": "a Hugging Face dataset",
    "bin": "nanoGPT's pre-tokenized files",
    "sft": "instruction data (.jsonl), learned on the answers",
    "preference": "preference pairs (.jsonl) for objective=dpo",
    "prompts": "prompts (.jsonl) and the fields their reward reads, for objective=grpo",
}
# File extensions of document corpora and the ``datasets`` builder that reads each.
DOCUMENT_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DATA_ROOT_ENV = "NANOGPT_DATA_ROOT"
DATA_ROOT = "~/.cache/nanogpt"


def default_data_root() -> str:
    """Where prepared datasets are cached unless data_root= says otherwise."""
    return os.environ.get(DATA_ROOT_ENV, DATA_ROOT)


def data_root_option():
    """The data_root= option, as every command that prepares or reads data declares it."""
    return options.option(default_factory=default_data_root,
                          help=f"shared cache of prepared datasets (env {DATA_ROOT_ENV}, else {DATA_ROOT})")


@dataclass
class DatasetConfig:
    """Where the text comes from, how it is tokenized and how it is split (the ``dataset`` group)."""

    name: str | None = options.option(
        None, "folder under data_root holding the prepared tokens; null: named after the source and "
        "settings (e.g. text-book-1a2b3c4d), so different data never shares a folder")
    source: str = options.option(
        "???", "a URL, a .txt file or folder of them, .jsonl/.parquet files, a Hugging Face dataset "
        "name (loader=hf) or a folder of nanoGPT train.bin/val.bin (loader=bin)")
    sha256: str | None = options.option(None, "expected sha256 of the source text; null accepts any text")
    tokenizer: str = options.option(
        "char", "char (the text's own characters), gpt2 or any tiktoken encoding, bpe (trained on the "
        "corpus; needs vocab_size), or the path of a Hugging Face tokenizer.json")
    vocab_size: int | None = options.option(
        None, "tokenizer=bpe: ids to train; loader=bin without meta.pkl: how many ids the files use")
    val_fraction: float = options.option(
        0.1, "share held out for validation: the last characters of a text, the last documents of a corpus")
    loader: str = options.option(
        "text", "; ".join(f"{name}: {reads}" for name, reads in LOADERS.items()),
        choices=lambda: tuple(LOADERS))
    subset: str | None = options.option(None, "hf: the dataset's configuration, e.g. FineWeb's sample-10BT")
    text_field: str = options.option("text", "documents: the column holding each document's text")
    num_proc: int | None = options.option(None, "processes that tokenize in parallel; null: all cores")

    def __post_init__(self) -> None:
        options.check_choices(self)
        t, v = self.tokenizer, self.vocab_size
        options.require(0 < self.val_fraction < 1,
                        f"val_fraction={self.val_fraction} must be between 0 and 1")
        without_tiktoken = "" if is_installed("tiktoken") else (
            "; tiktoken, which knows more encodings, is not installed: pip install tiktoken (or, in a clone "
            'of nanogpt, pip install -e ".[bpe]")')
        options.require(
            knows_tokenizer(t),
            f"tokenizer={t!r} is not one of {', '.join((*OWN_TOKENIZERS, *tiktoken_names()))}, "
            f"nor a path to a tokenizer.json{without_tiktoken}")
        options.require(t != "bpe" or self.loader != "bin",
                        "tokenizer=bpe is trained on text; with loader=bin name the tokenizer the .bin files "
                        "were made with (or give vocab_size)")
        options.require(t != "bpe" or v is not None,
                        "vocab_size is needed for tokenizer=bpe; e.g. dataset.vocab_size=8192")
        options.require(
            t != "bpe" or v is None or v > BYTE_ALPHABET,
            f"vocab_size={v} is below the 256-byte alphabet of tokenizer=bpe; use vocab_size >= 257 "
            "(256 bytes + <|endoftext|>)")
        options.require(v is None or v >= 1, f"vocab_size={v} must be at least 1")
        options.require(v is None or t == "bpe" or self.loader == "bin",
                        f"vocab_size={v} is only read by tokenizer=bpe and loader=bin; drop it")
        options.require(self.num_proc is None or self.num_proc >= 1,
                        f"num_proc={self.num_proc} must be at least 1 (or null for all cores)")
        if not options.is_unset(self.source):
            self.source = absolute_source(self.source)
            self.name = self.name or derived_name(self)

    def require_packages(self) -> None:
        """The optional packages this tokenizer and this kind of source need (checked before any work)."""
        if self.tokenizer == "bpe" or is_tokenizer_file(self.tokenizer):
            require_package("tokenizers", "bpe", f"dataset.tokenizer={self.tokenizer}")
        elif self.tokenizer != "char":  # a tiktoken encoding, GPT-2's included
            require_package("tiktoken", "bpe", f"dataset.tokenizer={self.tokenizer}")
        if self.loader == "hf" or (self.loader == "text" and is_document_corpus(self.source)):
            for module in ("datasets", "pyarrow"):
                require_package(module, "corpus", f"dataset.source={self.source} (a corpus of documents)")


def absolute_source(source: str) -> str:
    """A local file or folder as its absolute path; a URL, a Hub name or a missing path as given."""
    path = Path(source).expanduser()
    if is_url(source) or not path.exists():
        return source
    return str(path.resolve())


def derived_name(config: DatasetConfig) -> str:
    """The cache folder of an unnamed dataset: loader, source's name and a hash of what decides the tokens.

    The hash covers the source (its absolute path, URL or Hub name) and every
    setting but the name and num_proc: e.g. ``text-book-1a2b3c4d``.
    """
    settings = {k: v for k, v in asdict(config).items() if k not in ("name", "num_proc")}
    if is_tokenizer_file(config.tokenizer):
        settings["tokenizer"] = str(Path(config.tokenizer).expanduser().resolve())
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    stem = Path(config.source.rstrip("/")).stem or "source"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:40].strip("._") or "source"
    return f"{config.loader}-{stem}-{digest}"


def is_document_corpus(source: str) -> bool:
    """True for a local .jsonl/.json/.parquet file, or a folder holding such files and no .txt."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix in DOCUMENT_BUILDERS
    if path.is_dir():
        suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
        return bool(suffixes & set(DOCUMENT_BUILDERS)) and ".txt" not in suffixes
    return False
