"""Your own data: streaming preparation, token width, tokenizers, nanoGPT's .bin files.

Everything runs for real: the worker pool, Hugging Face tokenizers, tiktoken,
``python -m nanogpt.data`` (in a subprocess for the bad-input table's first row, else in
this process: tests/commands.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from nanogpt.dataset import sources
from nanogpt.dataset.batches import BatchSampler
from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.pipeline import prepare_data
from nanogpt.errors import ConfigError, DataError
from nanogpt.text.nanogpt_meta import read_nanogpt_meta_pkl
from nanogpt.text.tokenizers import load_tokenizer, train_bpe

from .commands import run_in_process
from .conftest import TINY_RUN, run_module

# sha256 of Tiny Shakespeare's token files as prepared before streaming preparation existed
# (commit 2c603bc): the parity and resume figures in the docs were measured on these bytes.
SHAKESPEARE_BINS = {
    "char": {"train": "6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f",
             "val": "d37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1"},
    "gpt2": {"train": "502a2bdc8210d1ac5d5674867cb74467dd31db575d25cf6dbb08c8bdbea8680f",
             "val": "68a53422394c26a655ebe641f5c6f49888e8f4e45fe5d6f02abda63ba3ebd65b"},
}

# Multi-byte characters on purpose: pieces must never cut one in half.
LINES = [f"{who}: ça va, {n} ☃ 東京 and\tsome words here.\n"
         for n in range(400) for who in ("ROMEO", "JULIET")]
TEXT = "".join(LINES) * 3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokens(data, split: str) -> list[int]:
    return np.fromfile(data.split_path(split), dtype=data.dtype).tolist()


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "mine.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def small_pieces(monkeypatch):
    """Cut text into ~2 kB pieces so that even a small file is tokenized by many tasks over 2 processes."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 2048)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_tiny_shakespeare_files_are_byte_identical_to_before(tokenizer, shakespeare, tmp_path, data_root,
                                                             bpe_cache):
    preset = {"char": "shakespeare_char", "gpt2": "shakespeare"}[tokenizer]
    result = run_in_process("nanogpt.data", f"dataset={preset}", f"dataset.source={shakespeare}",
                            f"data_root={data_root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for split, expected in SHAKESPEARE_BINS[tokenizer].items():
        assert sha256(data_root / preset / f"{split}.bin") == expected, split
    assert json.loads((data_root / preset / "meta.json").read_text())["dtype"] == "uint16"


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_pieces_over_processes_give_the_ids_of_the_whole_text(tokenizer, text_file, data_root, small_pieces,
                                                              bpe_cache):
    assert len(sources.text_ranges(text_file)) > 20
    data = prepare_data("mine", str(text_file), data_root, tokenizer=tokenizer, num_proc=2)
    n_train = int(len(TEXT) * 0.9)
    codec = load_tokenizer(data.meta["tokenizer"])
    encode, decode = codec.encode, codec.decode
    if tokenizer == "gpt2":  # a cut anywhere else than a clean newline would change these ids
        assert tokens(data, "train") == tiktoken.get_encoding("gpt2").encode_ordinary(TEXT[:n_train])
    else:
        assert tokens(data, "train") == encode(TEXT[:n_train])
    assert decode(tokens(data, "val")) == TEXT[n_train:]
    assert data.meta["characters"] == len(TEXT)


def test_a_vocabulary_above_uint16_is_stored_as_uint32(tmp_path, data_root):
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000]
    text = "".join(alphabet) * 2
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    data = prepare_data("wide", str(path), data_root, num_proc=2)
    assert data.vocab_size == len(alphabet) > 65_536
    assert data.meta["dtype"] == "uint32" and data.dtype == np.uint32
    assert data.split_path("train").stat().st_size == 4 * data.meta["train_tokens"]
    decode = load_tokenizer(data.meta["tokenizer"]).decode
    assert decode(tokens(data, "val")) == text[int(len(text) * 0.9):]
    assert max(tokens(data, "train")) >= 65_536  # ids a uint16 file would have wrapped around
    x, _ = BatchSampler(data, block_size=64, batch_size=4, device=torch.device("cpu")).get_batch("train")
    assert decode(x[0].tolist()) in text


def test_bpe_is_trained_on_the_corpus_deterministically(text_file, tmp_path, small_pieces):
    first = prepare_data("b", str(text_file), tmp_path / "one", tokenizer="bpe", vocab_size=400, num_proc=2)
    second = prepare_data("b", str(text_file), tmp_path / "two", tokenizer="bpe", vocab_size=400, num_proc=1)
    assert first.meta["tokenizer"] == second.meta["tokenizer"]
    assert first.meta["tokenizer"]["kind"] == "hf" and first.vocab_size == 400
    for split in ("train", "val"):
        assert sha256(first.split_path(split)) == sha256(second.split_path(split))
    codec = load_tokenizer(first.meta["tokenizer"])
    encode, decode = codec.encode, codec.decode
    n_train = int(len(TEXT) * 0.9)
    assert decode(tokens(first, "val")) == TEXT[n_train:]
    assert tokens(first, "train") == encode(TEXT[:n_train])  # pieces joined = the whole text's ids
    assert first.meta["train_tokens"] < n_train / 2  # it learned merges, not just bytes


def test_a_tokenizer_json_file_is_used_and_carried_whole(text_file, tmp_path, data_root):
    trained = train_bpe([TEXT], 300)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(trained.description["json"])
    data = prepare_data("j", str(text_file), data_root, tokenizer=str(path))
    assert data.meta["tokenizer"]["json"] == trained.description["json"]
    path.unlink()  # the description alone must do: checkpoints carry it, not the file's path
    decode = load_tokenizer(data.meta["tokenizer"]).decode
    assert decode(tokens(data, "val")) == TEXT[int(len(TEXT) * 0.9):]


def test_bpe_model_exports_a_tokenizer_that_autotokenizer_matches(text_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    common = [*TINY_RUN, "dataset=text", f"dataset.source={text_file}", "dataset.name=mine",
              "dataset.tokenizer=bpe", "dataset.vocab_size=320", f"data_root={tmp_path / 'data'}"]
    trained = run_in_process("nanogpt.train", *common, "max_iters=2", "eval_interval=2", "logger=none",
                             "hydra.run.dir=run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    exported = run_in_process("nanogpt.export", "ckpt=run", "out=hf", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    ours = load_tokenizer(json.loads((tmp_path / "hf" / "nanogpt_tokenizer.json").read_text())).encode
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = "JULIET: ça va, 17 ☃ 東京 — unseen words too!\n"
    assert theirs(sample)["input_ids"] == ours(sample)
    assert theirs.decode(ours(sample)) == sample


def test_jsonl_documents_go_through_the_text_path(tmp_path, data_root):
    path = tmp_path / "docs.jsonl"
    documents = [f"document {i}: " + "abc " * (i % 5) for i in range(50)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    data = prepare_data("docs", str(path), data_root, val_fraction=0.1, num_proc=2)
    decode = load_tokenizer(data.meta["tokenizer"]).decode
    assert data.meta["documents"] == {"train": 45, "val": 5}
    assert decode(tokens(data, "val")) == "".join(documents[45:])  # the last documents, in order


def write_nanogpt_dir(folder: Path, text: str, meta: dict | None = "char") -> list[str]:
    """A folder as nanoGPT's shakespeare_char/prepare.py leaves it; returns the vocabulary."""
    folder.mkdir()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:n]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in text[n:]], dtype=np.uint16).tofile(folder / "val.bin")
    if meta == "char":
        with open(folder / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return chars


def test_nanogpt_bin_folder_trains_unchanged(tmp_path, data_root):
    folder = tmp_path / "nanogpt_data"
    chars = write_nanogpt_dir(folder, TEXT)
    result = run_in_process("nanogpt.data", "dataset=text", "dataset.loader=bin", f"dataset.source={folder}",
                            "dataset.name=theirs", f"data_root={data_root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((data_root / "theirs" / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "char", "vocabulary": chars} and meta["vocab_size"] == len(chars)
    for split in ("train", "val"):
        assert (data_root / "theirs" / f"{split}.bin").read_bytes() == (folder / f"{split}.bin").read_bytes()


def test_bin_folder_without_meta_pkl_takes_a_vocab_size(tmp_path, data_root):
    folder = tmp_path / "ids"
    write_nanogpt_dir(folder, TEXT, meta=None)
    data = prepare_data("ids", str(folder), data_root, loader="bin", vocab_size=1000)
    assert data.meta["tokenizer"] == {"kind": "ids", "vocab_size": 1000}
    codec = load_tokenizer(data.meta["tokenizer"])
    encode, decode = codec.encode, codec.decode
    assert encode(decode([5, 7, 999])) == [5, 7, 999]


class Payload:
    """Pickles as a call to os.system, as a crafted meta.pkl would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_meta_pkl_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 3, "itos": Payload(marker)}))
    with pytest.raises(DataError, match="refused"):
        read_nanogpt_meta_pkl(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is real: a plain unpickler runs it
    assert marker.exists()


def test_config_names_the_bare_field():
    with pytest.raises(ConfigError, match=r"^vocab_size=100 is below the 256-byte alphabet of tokenizer=bpe"):
        DatasetConfig(name="x", source="y", tokenizer="bpe", vocab_size=100)
    with pytest.raises(ConfigError, match=r"^loader='csv' is not one of text, hf, bin"):
        DatasetConfig(name="x", source="y", loader="csv")
    DatasetConfig()  # OmegaConf builds the defaults with name/source still '???'


# --- bad input: one error line, exit 2, nothing left in the cache ---------------------------


@pytest.fixture
def bad(tmp_path):
    """Broken inputs, by name."""
    names = {"empty": "empty.txt", "mixed": "mixed", "short": "short.txt", "garbled_json": "garbled.json",
             "no_val": "no_val", "ok": "ok.txt"}
    files = {key: tmp_path / name for key, name in names.items()}
    files["empty"].write_text("")
    files["mixed"].mkdir()
    (files["mixed"] / "a.txt").write_text("fine text\n" * 10, encoding="utf-8")
    (files["mixed"] / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 10)
    files["short"].write_text("too short for a block\n" * 3)
    files["garbled_json"].write_text('{"model": {"type": "BPE", "vocab": ')
    write_nanogpt_dir(files["no_val"], TEXT)
    (files["no_val"] / "val.bin").unlink()
    files["ok"].write_text(TEXT)
    return files


BAD = [
    (("dataset.source={empty}",), "dataset.source {empty} is empty"),
    (("dataset.source={mixed}",), "dataset.source {mixed}/b.txt is not UTF-8 text (byte 3 cannot"),
    (("dataset.source={ok}", "dataset.tokenizer=bpe", "dataset.vocab_size=100"),
     "vocab_size=100 is below the 256-byte alphabet of tokenizer=bpe; use vocab_size >= 257"),
    (("dataset.source={ok}", "dataset.tokenizer=/no/such/tokenizer.json"),
     "dataset.tokenizer=/no/such/tokenizer.json does not exist"),
    (("dataset.source={ok}", "dataset.tokenizer={garbled_json}"),
     "dataset.tokenizer={garbled_json} is not a Hugging Face tokenizer.json"),
    (("dataset.loader=bin", "dataset.source={no_val}"), "dataset.source {no_val} has no val.bin"),
    (("dataset.source={ok}", "dataset.tokenizer=cl100k_base"), "cl100k_base.tiktoken; offline, fetch"),
]


@pytest.mark.parametrize("args, expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_own_data_is_one_line_and_leaves_nothing(args, expected, bad, tmp_path):
    root = tmp_path / "root"
    run = run_module if (args, expected) == BAD[0] else run_in_process  # the table's one real process
    args = [a.format(**bad) for a in args]
    result = run("nanogpt.data", "dataset=text", "dataset.name=mine", f"data_root={root}", *args,
                 cwd=tmp_path, env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "no_tiktoken_files")})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected.format(**bad) in lines[0]
    left = sorted(p.name for p in (root / "mine").iterdir()) if (root / "mine").exists() else []
    assert left in ([], [".lock"])


def test_a_corpus_shorter_than_two_blocks_stops_training_with_one_line(bad, tmp_path):
    result = run_in_process("nanogpt.train", *TINY_RUN, "dataset=text", f"dataset.source={bad['short']}",
                            "max_iters=1", f"data_root={tmp_path / 'root'}", "hydra.run.dir=run",
                            cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "too few for model.block_size=32" in lines[0], result.stderr
