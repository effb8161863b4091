"""Datasets: fetch a text, turn it into token ids, and serve training batches.

Prepared data is a shared cache, not part of a run: each dataset lives in
``data_root/<name>/`` as ``train.bin`` and ``val.bin`` (uint16 token ids) plus
``meta.json`` (tokenizer, sizes, where the text came from and its sha256). It is
prepared once, under a file lock so concurrent jobs never race, and reused until
its source changes. Nothing here imports Hydra.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from filelock import FileLock
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from nanogpt.bpe import GPT2_ENCODING, gpt2_encoding
from nanogpt.errors import DataError
from nanogpt.fileio import sha256_of_file, write_atomically
from nanogpt.options import check_choices, option, require

log = logging.getLogger("nanogpt.data")

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# Bumped whenever the prepared format changes, so old caches are rebuilt.
PREPARED_FORMAT = 1


@dataclass
class DatasetConfig:
    """Where the text comes from, how it is tokenized and split."""

    name: str = option("???", "folder under data_root holding the prepared tokens")
    source: str = option("???", "URL, text file, or directory of .txt files (hf: a dataset name or folder)")
    sha256: str | None = option(None, "expected checksum of the source text, if known")
    tokenizer: str = option("char", "char: the text's own characters; gpt2: GPT-2 BPE (tiktoken)",
                            choices=("char", "gpt2"))
    val_fraction: float = option(0.1, "the last this fraction of the text is the validation split")
    loader: str = option("text", "text: source is text; hf: a Hugging Face dataset or .jsonl/.parquet files",
                         choices=("text", "hf"))
    subset: str | None = option(None, "hf: the dataset's configuration, e.g. FineWeb's sample-10BT")
    text_field: str = option("text", "hf: the column holding each document")
    num_proc: int | None = option(None, "hf: tokenizer processes; null: all cores")

    def __post_init__(self):
        check_choices(self)
        require(0 < self.val_fraction < 1, f"val_fraction={self.val_fraction} must be between 0 and 1")


def is_url(source: str) -> bool:
    """True for an http(s) address, False for a local path."""
    return source.startswith(("http://", "https://"))


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> Path:
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
        reason = describe_request_error(e)
        raise DataError(
            f"could not download {url} ({reason}); check the address, or point "
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


def check_sha256(path: Path, expected: str | None, source: str) -> None:
    """Raise DataError if path's sha256 differs from expected (None skips the check)."""
    if expected is None:
        return
    actual = sha256_of_file(path)
    if actual != expected:
        raise DataError(
            f"{source} has sha256 {actual}, expected {expected}; the file is not the known "
            "dataset (set dataset.sha256=null to accept a different text)"
        )


def download_shakespeare(
    dest: Path, source: str = SHAKESPEARE_URL, sha256: str | None = SHAKESPEARE_SHA256
) -> Path:
    """Fetch Tiny Shakespeare (1,115,394 characters) to dest, from a URL or a local copy."""
    return fetch_text_source(source, dest, sha256)


def fetch_text_source(source: str, dest: Path, sha256: str | None = None) -> Path:
    """Bring a dataset's raw text to dest: download a URL, or copy a local file.

    A local directory is read as all its ``*.txt`` files, in sorted order,
    joined together. A copy that is already at dest with the expected sha256
    is kept as it is.
    """
    if sha256 is not None and dest.exists() and sha256_of_file(dest) == sha256:
        return dest
    if is_url(source):
        return download(source, dest, sha256)

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"dataset.source {path} is a directory with no .txt files in it")

        def concatenate(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                for file in files:
                    with open(file, "rb") as f:
                        shutil.copyfileobj(f, out)

        write_atomically(dest, concatenate)
    elif path.is_file():
        write_atomically(dest, lambda tmp: shutil.copyfile(path, tmp))
    else:
        raise DataError(
            f"dataset.source {path} does not exist; give a URL, a text file or a directory of .txt files"
        )
    try:
        check_sha256(dest, sha256, str(path))
    except DataError:
        dest.unlink(missing_ok=True)
        raise
    return dest


def get_vocabulary(text: str) -> list[str]:
    """The sorted list of distinct characters in text: a character-level vocabulary."""
    return sorted(set(text))


class UnknownTokenError(DataError):
    """Text contains a character the vocabulary does not have."""


def create_encoder_decoder(
    vocabulary: list[str],
) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """Return (encode, decode) between strings and ids for a character vocabulary."""
    stoi = {ch: i for i, ch in enumerate(vocabulary)}

    def encode(text: str) -> list[int]:
        """Map each character of text to its id."""
        try:
            return [stoi[ch] for ch in text]
        except KeyError as e:
            ch = e.args[0]
            raise UnknownTokenError(
                f"character {ch!r} (U+{ord(ch):04X}) is not in the vocabulary of "
                f"{len(vocabulary)} characters; use only characters from the training text"
            ) from None

    def decode(ids: list[int]) -> str:
        """Map ids back to characters and join them."""
        return "".join(vocabulary[i] for i in ids)

    return encode, decode


def tokenizer_codec(description: dict) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) for a tokenizer as described in meta.json and in checkpoints."""
    if description.get("kind") == "char":
        return create_encoder_decoder(description["vocabulary"])
    if description.get("kind") == "tiktoken" and description.get("encoding") == GPT2_ENCODING:
        encoding = gpt2_encoding()
        # Special tokens such as <|endoftext|> in a prompt are read as plain text.
        return encoding.encode_ordinary, encoding.decode
    raise DataError(
        f"unknown tokenizer {description!r}; this version knows char and tiktoken gpt2"
    )


# dataset.tokenizer names -> the description stored in meta.json and checkpoints.
TOKENIZERS = ("char", "gpt2")


def describe_tokenizer(name: str, text: str = "") -> dict:
    """The stored description of tokenizer name; a char vocabulary is built from text."""
    if name == "char":
        return {"kind": "char", "vocabulary": get_vocabulary(text)}
    if name == "gpt2":
        return {"kind": "tiktoken", "encoding": GPT2_ENCODING}
    raise DataError(f"dataset.tokenizer={name!r} is not known; use one of: {', '.join(TOKENIZERS)}")


def tokenizer_vocab_size(description: dict) -> int:
    """How many token ids a tokenizer can produce."""
    if description["kind"] == "char":
        return len(description["vocabulary"])
    return gpt2_encoding().n_vocab


@dataclass
class PreparedData:
    """Where a prepared dataset lives, and its metadata."""

    directory: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids the model must cover."""
        return self.meta["vocab_size"]

    def split_path(self, split: str) -> Path:
        """Path of the token file for 'train' or 'val'."""
        return self.directory / f"{split}.bin"


def prepare_data(
    name: str,
    source: str,
    data_root: Path,
    sha256: str | None = None,
    val_fraction: float = 0.1,
    tokenizer: str = "char",
) -> PreparedData:
    """Prepare a text dataset once: raw text -> train.bin, val.bin, meta.json.

    tokenizer is "char" (a vocabulary of the text's characters) or "gpt2"
    (GPT-2's BPE via tiktoken). The first (1 - val_fraction) of the text's
    characters is for training, the rest for validation. Concurrent callers
    wait on a lock; whoever comes second finds the work done. A cache whose
    source, checksum or settings differ is rebuilt.
    """
    directory = Path(data_root).expanduser() / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data_root={data_root}: cannot create {directory} ({e.strerror}); give a writable directory"
        ) from None
    with FileLock(str(directory / ".lock")):
        # A URL is fetched only when no cache of it exists yet; a local source is
        # re-read every time, so an edited file is noticed.
        if is_url(source) and _cache_is_current(directory, source, sha256, val_fraction, tokenizer):
            return PreparedData(directory, read_meta(directory))
        raw = directory / "input.txt"
        fetch_text_source(source, raw, sha256)
        source_sha256 = sha256_of_file(raw)
        if _cache_is_current(directory, source, source_sha256, val_fraction, tokenizer):
            return PreparedData(directory, read_meta(directory))

        try:
            text = raw.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raw.unlink()  # nothing half-made stays in the shared cache
            raise DataError(
                f"dataset.source {source} is not UTF-8 text (byte {e.start} cannot be decoded); "
                "convert it to UTF-8, e.g. with iconv"
            ) from None
        description = describe_tokenizer(tokenizer, text)
        vocab_size = tokenizer_vocab_size(description)
        if vocab_size > np.iinfo(np.uint16).max + 1:
            raise DataError(f"{source} has {vocab_size} distinct characters; at most 65536 fit uint16")
        encode, _ = tokenizer_codec(description)
        n_train = int(len(text) * (1 - val_fraction))
        splits = {"train": text[:n_train], "val": text[n_train:]}
        meta = {
            "format": PREPARED_FORMAT,
            "name": name,
            "source": source,
            "source_sha256": source_sha256,
            "val_fraction": val_fraction,
            "tokenizer": description,
            "vocab_size": vocab_size,
        }
        for split, part in tqdm(splits.items(), desc=f"tokenize {name}", disable=None):
            ids = np.array(encode(part), dtype=np.uint16)
            meta[f"{split}_tokens"] = int(ids.size)
            write_atomically(directory / f"{split}.bin", lambda tmp, ids=ids: ids.tofile(tmp))
        # meta.json goes last: its presence says the token files are complete.
        write_atomically(
            directory / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1))
        )
        log.info("prepared %s into %s", name, directory)
        return PreparedData(directory, meta)


def read_meta(directory: Path) -> dict:
    """Load a prepared dataset's meta.json."""
    return json.loads((directory / "meta.json").read_text())


def _cache_is_current(
    directory: Path, source: str, sha256: str | None, val_fraction: float, tokenizer: str = "char"
) -> bool:
    """True when directory already holds this source prepared with these settings."""
    try:
        meta = read_meta(directory)
    except (OSError, ValueError):
        return False
    return (
        meta.get("format") == PREPARED_FORMAT
        and meta.get("source") == source
        and (sha256 is None or meta.get("source_sha256") == sha256)
        and meta.get("val_fraction") == val_fraction
        and meta.get("tokenizer", {}).get("kind") == describe_tokenizer(tokenizer)["kind"]
        and all((directory / f"{s}.bin").exists() for s in ("train", "val"))
    )


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
        self.splits = {
            split: np.memmap(data.split_path(split), dtype=np.uint16, mode="r")
            for split in ("train", "val")
        }
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

    Hydra is imported here, at the edge, so the rest of this module stays free of it.
    """
    from nanogpt.cli import hydra_entry, to_dataclass
    from nanogpt.config import DataConfig
    from nanogpt.corpus import prepare_dataset

    @hydra_entry("data")
    def prepare(cfg) -> None:
        """Prepare the composed dataset and say where it went."""
        config = to_dataclass(cfg, DataConfig)
        data = prepare_dataset(config.dataset, Path(config.data_root))
        print(
            f"{config.dataset.name}: {data.meta['train_tokens']:,} train and "
            f"{data.meta['val_tokens']:,} val tokens, vocabulary {data.vocab_size}, in {data.directory}"
        )

    prepare()


if __name__ == "__main__":
    main()
