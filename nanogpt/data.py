"""Datasets: one pipeline from any source to token files, and the batches training reads.

Prepared data is a shared cache, not part of a run: each dataset lives in
``data_root/<name>/`` as ``train.bin`` and ``val.bin`` (token ids, uint16 while
the vocabulary fits, else uint32) plus ``meta.json`` (tokenizer, dtype, sizes,
where the text came from). Every source goes through prepare_dataset(): under a
file lock, so concurrent jobs prepare once; skipped while the source and the
settings are unchanged; written piece by piece in parallel, so memory stays flat
whatever the corpus size; meta.json last, so its presence means complete. What
differs between a text file, a document corpus and nanoGPT's .bin files is only
how their text is read (nanogpt/sources.py). Nothing here imports Hydra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from omegaconf import OmegaConf
from tqdm import tqdm

from nanogpt import options
from nanogpt.errors import DataError
from nanogpt.fileio import write_atomically
from nanogpt.pickles import read_nanogpt_meta_pkl
from nanogpt.sources import (
    DOCUMENTS_PER_TASK,
    BinSource,
    DocumentReader,
    DocumentSource,
    TextReader,
    TextSource,
    description_json,
    download,
    encode_into_task,
    encode_task,
    is_document_corpus,
    link_or_copy,
    scan_task,
    start_pool_worker,
    start_worker,
    stop_worker,
    text_ranges,
)
from nanogpt.tokenizer import (
    BYTE_ALPHABET,
    OWN_TOKENIZERS,
    UnknownTokenError,
    create_encoder_decoder,
    describe_tokenizer,
    get_vocabulary,
    is_tokenizer_file,
    load_tokenizer,
    tiktoken_names,
    tokenizer_codec,
    train_bpe,
)

__all__ = [  # the PRD's names and what other modules import from here
    "BatchSampler", "DatasetConfig", "PreparedData", "UnknownTokenError", "create_encoder_decoder",
    "download", "download_shakespeare", "get_vocabulary", "prepare_data", "prepare_dataset",
    "tokenizer_codec",
]

log = logging.getLogger("nanogpt.data")

# Bumped whenever the prepared format changes, so old caches are rebuilt (2: dtype in meta.json).
PREPARED_FORMAT = 2
PRODUCTS = ("meta.json", "train.bin", "val.bin", "input.txt")  # removed if a preparation fails
LOADERS = ("text", "hf", "bin")


@dataclass
class DatasetConfig:
    """Where the text comes from, how it is tokenized and how it is split (the ``dataset`` group)."""

    name: str = options.option("???", "folder under data_root holding the prepared tokens")
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
        "text", "text: text files (or .jsonl/.parquet documents); hf: a Hugging Face dataset; "
        "bin: nanoGPT's pre-tokenized files", choices=LOADERS)
    subset: str | None = options.option(None, "hf: the dataset's configuration, e.g. FineWeb's sample-10BT")
    text_field: str = options.option("text", "documents: the column holding each document's text")
    num_proc: int | None = options.option(None, "processes that tokenize in parallel; null: all cores")

    def __post_init__(self) -> None:
        options.check_choices(self)
        t, v = self.tokenizer, self.vocab_size
        options.require(0 < self.val_fraction < 1,
                        f"val_fraction={self.val_fraction} must be between 0 and 1")
        options.require(
            t in OWN_TOKENIZERS or t in tiktoken_names() or is_tokenizer_file(t),
            f"tokenizer={t!r} is not one of {', '.join((*OWN_TOKENIZERS, *tiktoken_names()))}, "
            "nor a path to a tokenizer.json")
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


def dataset_presets() -> Path:
    """conf/dataset/ in a checkout, or its copy inside an installed wheel."""
    package = Path(__file__).resolve().parent
    inside = package / "conf" / "dataset"
    return inside if inside.is_dir() else package.parent / "conf" / "dataset"


def download_shakespeare(dest: Path, source: str | None = None, sha256: str | None = None) -> Path:
    """Fetch Tiny Shakespeare (1,115,394 characters) to dest, from a URL or a local copy.

    Its address and checksum are declared once, in conf/dataset/shakespeare_char.yaml
    (where NANOGPT_SHAKESPEARE_SOURCE can replace the address); they are read from there.
    """
    preset = OmegaConf.load(dataset_presets() / "shakespeare_char.yaml")
    TextSource(source or preset.source, sha256 or preset.sha256).fetch(Path(dest))
    return Path(dest)


@dataclass
class PreparedData:
    """Where a prepared dataset lives, and its metadata."""

    directory: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids the model must cover."""
        return self.meta["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        """The integer type of the token files (caches from before uint32 existed are uint16)."""
        return np.dtype(self.meta.get("dtype", "uint16"))

    def split_path(self, split: str) -> Path:
        """Path of the token file for 'train' or 'val'."""
        return self.directory / f"{split}.bin"

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (nothing is read until used)."""
        if self.meta.get(f"{split}_tokens", 1) == 0:
            return np.zeros(0, dtype=self.dtype)  # a memmap of an empty file is an error
        return np.memmap(self.split_path(split), dtype=self.dtype, mode="r")


def prepare_data(
    name: str,
    source: str,
    data_root: Path,
    sha256: str | None = None,
    val_fraction: float = 0.1,
    tokenizer: str = "char",
    **settings,
) -> PreparedData:
    """Prepare a dataset once: source -> train.bin, val.bin, meta.json (the PRD's function).

    settings are the other DatasetConfig fields (loader, vocab_size, num_proc, ...);
    they are checked exactly as a composed config is.
    """
    config = DatasetConfig(name=name, source=source, sha256=sha256, val_fraction=val_fraction,
                           tokenizer=tokenizer, **settings)
    return prepare_dataset(config, data_root)


def open_source(config: DatasetConfig) -> TextSource | DocumentSource | BinSource:
    """The source a config describes; every kind then goes through the same steps."""
    if config.loader == "bin":
        return BinSource(config.source)
    if config.loader == "hf" or is_document_corpus(config.source):
        return DocumentSource(config.source, config.subset, config.text_field)
    return TextSource(config.source, config.sha256)


def prepare_dataset(config: DatasetConfig, data_root: Path | str) -> PreparedData:
    """Prepare what a DatasetConfig describes, once; concurrent callers wait on a lock.

    The cache is reused while the source (a URL's address and checksum, a local
    file's size and modification time) and every setting are unchanged; a
    preparation that fails leaves none of its files behind.
    """
    source = open_source(config)
    # A tokenizer that needs no training is checked (file parses, encoding loads) before any work.
    named = None if config.tokenizer in OWN_TOKENIZERS else describe_tokenizer(config.tokenizer)
    settings = {**asdict(config), "format": PREPARED_FORMAT, "source": source.fingerprint()}
    settings.pop("num_proc")  # how many processes worked changes nothing in the result
    if named is not None and named["kind"] == "hf":
        # The file's content, not its path, decides the ids: an edited tokenizer.json rebuilds.
        settings["tokenizer_sha256"] = hashlib.sha256(named["json"].encode()).hexdigest()
    directory = Path(data_root).expanduser() / config.name
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data_root={data_root}: cannot create {directory} ({e.strerror}); give a writable directory"
        ) from None
    with FileLock(str(directory / ".lock")):
        meta = current_meta(directory, settings)
        if meta is not None:
            return PreparedData(directory, meta)
        (directory / "meta.json").unlink(missing_ok=True)  # from here on the cache is incomplete
        try:
            if isinstance(source, BinSource):
                made = copy_bins(config, source, directory, named)
            else:
                made = tokenize_source(config, source, directory, named)
        except BaseException:
            for name in PRODUCTS:  # nothing half-made stays in the shared cache
                (directory / name).unlink(missing_ok=True)
            raise
        meta = {"format": PREPARED_FORMAT, "name": config.name, "source": config.source,
                "val_fraction": config.val_fraction, **made, "settings": settings}
        # meta.json goes last: its presence says the token files are complete.
        write_atomically(directory / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        log.info("prepared %s into %s", config.name, directory)
        return PreparedData(directory, meta)


def read_meta(directory: Path) -> dict:
    """Load a prepared dataset's meta.json."""
    return json.loads((directory / "meta.json").read_text())


def current_meta(directory: Path, settings: dict) -> dict | None:
    """The cache's meta.json when it holds this source prepared with these settings, else None."""
    try:
        meta = read_meta(directory)
    except (OSError, ValueError):
        return None
    complete = all((directory / f"{split}.bin").exists() for split in ("train", "val"))
    return meta if complete and meta.get("settings") == json.loads(json.dumps(settings)) else None


# --- the steps of a preparation -------------------------------------------------------------


@contextmanager
def workers(reader, tokenizer: dict | None, processes: int) -> Iterator[Callable]:
    """run(function, tasks, desc): function over tasks in order, in `processes` worker processes.

    Workers are forked: they start at once and share the reader (a memory-mapped
    corpus, a file path) without copying it. One process, or one task, runs here.
    """
    tokenizer_json = description_json(tokenizer) if tokenizer is not None else None
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    # Workers are the parallelism; Hugging Face tokenizers then need no threads of their own
    # (and, told so before the fork, do not warn about it).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = None
    try:
        start_worker(reader, tokenizer_json)  # this process does the work when there is one piece

        def run(function, tasks: list, desc: str) -> Iterator:
            nonlocal pool
            if pool is None and processes > 1 and len(tasks) > 1:
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
                pool = multiprocessing.get_context(method).Pool(
                    processes, initializer=start_pool_worker, initargs=(reader, tokenizer_json))
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


def tokenize_source(config: DatasetConfig, source, directory: Path, named: dict | None) -> dict:
    """Read, split and tokenize a text or document source into train.bin and val.bin.

    Text: the first (1 - val_fraction) of its characters train, the rest validate.
    Documents: the last val_fraction of them validate, and each ends in the
    tokenizer's end-of-text token where it has one.
    """
    processes = config.num_proc or os.cpu_count() or 1
    made: dict = {}
    if isinstance(source, TextSource):
        raw = directory / "input.txt"
        made["source_sha256"] = source.fetch(raw)
        reader = TextReader(raw, source)
        pieces = text_ranges(raw)
        with workers(reader, None, processes) as run:
            scanned = list(run(scan_task, pieces, f"scan {config.name}"))
        made["characters"] = sum(count for count, _ in scanned)
        splits, piece_chars = split_text(reader, pieces, [count for count, _ in scanned],
                                         int(made["characters"] * (1 - config.val_fraction)))
        empty = made["characters"] == 0
    else:
        documents = source.fetch(directory, processes)
        reader = DocumentReader(documents, config.text_field)
        total = len(documents)
        n_val = math.ceil(total * config.val_fraction)
        splits = {"train": document_ranges(0, total - n_val), "val": document_ranges(total - n_val, total)}
        made["documents"] = {"train": total - n_val, "val": n_val}
        scanned, piece_chars = None, None
        if config.tokenizer == "char":
            with workers(reader, None, processes) as run:
                scanned = list(run(scan_task, splits["train"] + splits["val"], f"scan {config.name}"))
        empty = total == 0
    if empty:
        raise DataError(f"dataset.source {config.source} is empty; give it some text")

    if config.tokenizer == "char":
        points = np.unique(np.concatenate([present for _, present in scanned]))
        description = {"kind": "char", "vocabulary": [chr(p) for p in points.tolist()]}
    elif config.tokenizer == "bpe":
        training = (text for piece in splits["train"] for text in reader.texts(piece))
        description = train_bpe(training, config.vocab_size)
    else:
        description = named
    tokenizer = load_tokenizer(description_json(description))
    made.update(tokenizer=description, vocab_size=tokenizer.vocab_size, dtype=tokenizer.dtype)

    with workers(reader, description, processes) as run:
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


def document_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """Documents start..end-1 in tasks of DOCUMENTS_PER_TASK."""
    return [(i, min(i + DOCUMENTS_PER_TASK, end)) for i in range(start, end, DOCUMENTS_PER_TASK)]


def write_tokens(path: Path, arrays: Iterable[np.ndarray]) -> int:
    """Append arrays of ids to path in order (atomically); return how many were written."""
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "wb") as f:
            for ids in arrays:
                ids.tofile(f)
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


def copy_bins(config: DatasetConfig, source: BinSource, directory: Path, named: dict | None) -> dict:
    """Take nanoGPT's train.bin/val.bin as they are; the tokenizer comes from meta.pkl or the config.

    A char meta.pkl gives the vocabulary (nanoGPT's ``itos``); otherwise
    dataset.tokenizer names it (gpt2 for nanoGPT's BPE datasets), or
    dataset.vocab_size says how many ids there are when the tokenizer is unknown.
    """
    folder = source.directory()
    pickle_path = folder / "meta.pkl"
    if pickle_path.is_file():
        meta_pkl = read_nanogpt_meta_pkl(pickle_path)
        itos = meta_pkl.get("itos")
        if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))):
            raise DataError(f"{pickle_path} has no itos table of ids 0..N-1; give dataset.vocab_size "
                            "instead and remove meta.pkl")
        description = {"kind": "char", "vocabulary": [itos[i] for i in range(len(itos))]}
    elif config.tokenizer == "char" and config.vocab_size is None:
        raise DataError(f"dataset.source {folder} has no meta.pkl; name its tokenizer "
                        "(dataset.tokenizer=gpt2 for nanoGPT's BPE data) or give dataset.vocab_size")
    elif config.tokenizer == "char":
        description = {"kind": "ids", "vocab_size": config.vocab_size}
    else:
        description = named
    vocab_size = load_tokenizer(description_json(description)).vocab_size
    made = {"tokenizer": description, "vocab_size": vocab_size, "dtype": "uint16"}
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


class BatchSampler:
    """Random training windows from a prepared dataset's token files.

    Each batch row is block_size + 1 consecutive tokens: the model reads the
    first block_size and predicts the last block_size. The sampler draws from
    its own seeded generator, so its position can be saved and restored.
    Evaluation batches come from a second generator, so how often and how long
    a run evaluates does not change which batches it trains on.
    rank and world_size give a process of a distributed job its share of each batch.
    """

    def __init__(
        self,
        data: PreparedData,
        block_size: int,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.block_size = block_size
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.device = device
        self.splits = {split: data.tokens(split) for split in ("train", "val")}
        for split, tokens in self.splits.items():
            if len(tokens) <= block_size:
                raise DataError(
                    f"the {split} split of {data.meta['name']} has {len(tokens)} tokens, too few "
                    f"for model.block_size={block_size}; use a smaller block_size or more text"
                )
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_generator = torch.Generator().manual_seed(seed + 1)
        self.offsets = np.arange(block_size + 1)

    def get_batch(self, split: str, evaluation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (inputs, targets), each (batch_size, block_size) int64 on the device.

        evaluation=True draws from the evaluation generator instead of the training one.
        """
        tokens = self.splits[split]
        # In a job of world_size processes, each draws the whole job's batch from
        # the same generator and keeps its own rows: different data on every
        # process, and together exactly the batches one process would draw.
        starts = torch.randint(
            len(tokens) - self.block_size, (self.world_size * self.batch_size,),
            generator=self.eval_generator if evaluation else self.generator,
        ).numpy()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        windows = torch.from_numpy(tokens[starts[:, None] + self.offsets].astype(np.int64))
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with the GPU's work.
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def main() -> None:
    """``python -m nanogpt.data dataset=NAME``: prepare a dataset into the data root.

    Hydra is imported here, at the edge, so that a notebook importing this module
    never loads it (not to dodge an import cycle: config.py imports this module).
    """
    from nanogpt.cli import hydra_entry, to_dataclass
    from nanogpt.config import DataConfig

    @hydra_entry("data")
    def prepare(cfg) -> None:
        """Prepare the composed dataset and say where it went."""
        config = to_dataclass(cfg, DataConfig)
        started = time.perf_counter()
        data = prepare_dataset(config.dataset, Path(config.data_root))
        print(
            f"{config.dataset.name}: {data.meta['train_tokens']:,} train and "
            f"{data.meta['val_tokens']:,} val tokens, vocabulary {data.vocab_size} "
            f"({data.meta['dtype']}), in {data.directory} ({time.perf_counter() - started:.1f} s)"
        )

    prepare()


if __name__ == "__main__":
    main()
