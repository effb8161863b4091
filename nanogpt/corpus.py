"""Large corpora (OpenWebText, FineWeb) from Hugging Face ``datasets``, in GPT-2 BPE.

A corpus of millions of documents never passes through memory whole:
``datasets`` downloads it into Arrow files on disk, tokenizes it in parallel
(``num_proc`` processes, a batch of documents per tiktoken call) into more
Arrow files, and the token ids are then copied shard by shard into a uint16
memmap. Peak memory is one batch per process, whatever the corpus size.
Every document is followed by ``<|endoftext|>``, so the model sees where one
ends and the next begins.

The result has the same layout as every other prepared dataset (train.bin,
val.bin, meta.json in ``data_root/<name>/``) and the same lock, so the rest of
the platform needs to know nothing about where it came from. The
Hugging Face cache lives in ``data_root/<name>/hf_cache`` so that deleting the
folder frees everything. Nothing here imports Hydra.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from nanogpt.bpe import GPT2_ENCODING, gpt2_encoding
from nanogpt.data import PREPARED_FORMAT, PreparedData, prepare_data, read_meta
from nanogpt.errors import DataError
from nanogpt.fileio import write_atomically

# File extensions of local corpora and the ``datasets`` builder that reads each.
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
SPLIT_SEED = 2357  # fixed, so every machine draws the same validation documents
WRITE_BATCH = 1024  # documents per copy into the memmap


@dataclass
class CorpusSource:
    """Where a corpus comes from: a Hugging Face dataset name or local files."""

    source: str  # e.g. "Skylion007/openwebtext", or a .jsonl/.parquet file or folder of them
    subset: str | None = None  # the dataset's configuration, e.g. FineWeb's "sample-10BT"
    text_field: str = "text"  # the column holding each document's text

    def load_arguments(self) -> dict:
        """Keyword arguments for datasets.load_dataset that read this source."""
        path = Path(self.source).expanduser()
        if not path.exists():
            return {"path": self.source, "name": self.subset}
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path])
                       if p.suffix in LOCAL_BUILDERS)
        builders = {LOCAL_BUILDERS[p.suffix] for p in files}
        if len(builders) != 1:
            raise DataError(
                f"dataset.source {path} must hold files of one kind among "
                f"{', '.join(LOCAL_BUILDERS)}; found {sorted(builders) or 'none'}"
            )
        return {"path": builders.pop(), "data_files": [str(p) for p in files]}

    def shard_count(self) -> int | None:
        """How many local files there are to read in parallel; None for a hub dataset."""
        arguments = self.load_arguments()
        return len(arguments["data_files"]) if "data_files" in arguments else None

    def fingerprint(self) -> dict:
        """What identifies this source's content, to tell whether a prepared cache is current."""
        path = Path(self.source).expanduser()
        if not path.exists():
            return {"source": self.source, "subset": self.subset, "text_field": self.text_field}
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
        stamp = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return {"source": str(path), "subset": self.subset, "text_field": self.text_field, "files": stamp}


def tokenize_documents(batch: dict, text_field: str) -> dict:
    """GPT-2 token ids of a batch of documents, each ending in <|endoftext|>."""
    encoding = gpt2_encoding()
    ids = encoding.encode_ordinary_batch(batch[text_field])
    for document in ids:
        document.append(encoding.eot_token)
    return {"ids": ids, "len": [len(document) for document in ids]}


def write_token_file(split, path: Path, desc: str) -> int:
    """Copy the 'ids' column of a tokenized split into a uint16 file; return the token count.

    The file is allocated at its final size as a memmap and filled one batch of
    documents at a time, so memory use does not grow with the corpus.
    """
    lengths = split.with_format("numpy")["len"]
    total = int(np.sum(lengths, dtype=np.int64))

    def fill(tmp: Path) -> None:
        tokens = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(max(total, 1),))
        position = 0
        batches = split.select_columns(["ids"]).with_format("numpy").iter(batch_size=WRITE_BATCH)
        with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=None) as bar:
            for batch in batches:
                chunk = np.concatenate(list(batch["ids"])).astype(np.uint16)
                tokens[position:position + len(chunk)] = chunk
                position += len(chunk)
                bar.update(len(chunk))
        tokens.flush()
        del tokens
        if total == 0:  # an empty split: a memmap cannot be 0 bytes long
            os.truncate(tmp, 0)

    write_atomically(path, fill)
    return total


def prepare_corpus(
    name: str,
    corpus: CorpusSource,
    data_root: Path,
    val_fraction: float = 0.0005,
    num_proc: int | None = None,
) -> PreparedData:
    """Download (or read), tokenize and write a corpus once; later calls reuse it.

    val_fraction of the documents, drawn with a fixed seed, form the validation
    split. num_proc tokenizer processes run in parallel (None: all cores).
    """
    try:
        import datasets
    except ImportError:
        raise DataError(
            'preparing openwebtext/fineweb needs Hugging Face datasets: pip install -e ".[corpus]"'
        ) from None
    directory = Path(data_root).expanduser() / name
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = {**corpus.fingerprint(), "val_fraction": val_fraction}
    with FileLock(str(directory / ".lock")):
        try:
            meta = read_meta(directory)
            if meta.get("format") == PREPARED_FORMAT and meta.get("corpus") == fingerprint:
                return PreparedData(directory, meta)
        except (OSError, ValueError):
            pass
        gpt2_encoding()  # fail early, in this process, if the BPE files cannot be had
        num_proc = num_proc or os.cpu_count() or 1
        try:
            documents = datasets.load_dataset(
                **corpus.load_arguments(), split="train", cache_dir=str(directory / "hf_cache"),
                num_proc=min(num_proc, corpus.shard_count() or num_proc),
            )
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"could not load dataset.source={corpus.source}: {reason}") from None
        if corpus.text_field not in documents.column_names:
            raise DataError(
                f"dataset.text_field={corpus.text_field!r} is not a column of {corpus.source}; "
                f"its columns are: {', '.join(documents.column_names)}"
            )
        splits = documents.train_test_split(test_size=val_fraction, seed=SPLIT_SEED, shuffle=True)
        tokenized = splits.map(
            tokenize_documents, fn_kwargs={"text_field": corpus.text_field}, batched=True,
            remove_columns=documents.column_names, num_proc=min(num_proc, len(documents)),
            desc=f"tokenize {name}",
        )
        encoding = gpt2_encoding()
        meta = {
            "format": PREPARED_FORMAT,
            "name": name,
            "source": corpus.source,
            "corpus": fingerprint,
            "val_fraction": val_fraction,
            "documents": {"train": len(tokenized["train"]), "val": len(tokenized["test"])},
            "tokenizer": {"kind": "tiktoken", "encoding": GPT2_ENCODING},
            "vocab_size": encoding.n_vocab,
        }
        for split, part in (("train", tokenized["train"]), ("val", tokenized["test"])):
            meta[f"{split}_tokens"] = write_token_file(part, directory / f"{split}.bin", f"write {split}.bin")
        # meta.json last: its presence says the token files are complete.
        write_atomically(directory / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        return PreparedData(directory, meta)


def prepare_dataset(dataset, data_root: Path) -> PreparedData:
    """Prepare whatever a DatasetConfig describes: a text (char or gpt2) or a hf corpus."""
    if dataset.loader == "hf":
        if dataset.tokenizer != "gpt2":
            raise DataError(
                f"dataset.tokenizer={dataset.tokenizer} does not work with dataset.loader=hf; use gpt2"
            )
        corpus = CorpusSource(dataset.source, dataset.subset, dataset.text_field)
        return prepare_corpus(dataset.name, corpus, data_root, dataset.val_fraction, dataset.num_proc)
    if dataset.loader != "text":
        raise DataError(f"dataset.loader={dataset.loader!r} is not known; use text or hf")
    return prepare_data(
        dataset.name, dataset.source, Path(data_root), sha256=dataset.sha256,
        val_fraction=dataset.val_fraction, tokenizer=dataset.tokenizer,
    )
