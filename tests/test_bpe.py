"""GPT-2 BPE: the offline tiktoken route, BPE datasets, and large-corpus preparation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

from nanogpt.dataset.pipeline import prepare_data
from nanogpt.text.gpt2_files import GPT2_FILES, seed_tiktoken_cache
from nanogpt.text.tokenizers import load_tokenizer
from tests.commands import run_in_process
from tests.conftest import REPO, TINY_RUN

EOT = 50256


def test_seeded_cache_makes_real_tiktoken_work_offline(tmp_path):
    cache = seed_tiktoken_cache(tmp_path / "cache")
    for url, sha256 in GPT2_FILES.values():
        stored = cache / hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha256
    # A fresh process with only this cache: tiktoken would download, the cache answers instead.
    code = ("import tiktoken; e = tiktoken.get_encoding('gpt2'); "
            "print(e.encode_ordinary('Hello world'), e.n_vocab)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[15496,", "995]", "50257"]


def test_bpe_command_seeds_a_given_folder(tmp_path):
    result = run_in_process("nanogpt.text.gpt2_files", str(tmp_path / "tk"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "50257 tokens" in result.stdout
    assert len(list((tmp_path / "tk").iterdir())) == 2


def test_shakespeare_bpe_counts_equal_tiktoken_on_the_same_split(shakespeare, tmp_path, data_root, bpe_cache):
    result = run_in_process(
        "nanogpt.data", "dataset=shakespeare", f"dataset.source={shakespeare}", f"data_root={data_root}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    text = shakespeare.read_text(encoding="utf-8")
    n_train = int(len(text) * 0.9)
    encoding = tiktoken.get_encoding("gpt2")
    expected = {"train": encoding.encode_ordinary(text[:n_train]),
                "val": encoding.encode_ordinary(text[n_train:])}
    meta = json.loads((data_root / "shakespeare" / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "tiktoken", "encoding": "gpt2"}
    assert meta["vocab_size"] == 50257
    for split, ids in expected.items():
        stored = np.fromfile(data_root / "shakespeare" / f"{split}.bin", dtype=np.uint16)
        assert meta[f"{split}_tokens"] == len(ids) == stored.size
        assert stored.tolist() == ids
    # The figures nanoGPT's own prepare script prints for this text.
    assert (meta["train_tokens"], meta["val_tokens"]) == (301966, 36059)


def test_text_dataset_takes_either_tokenizer(corpus, data_root, bpe_cache):
    char = prepare_data("c", str(corpus), data_root, tokenizer="char")
    bpe = prepare_data("c", str(corpus), data_root, tokenizer="gpt2")  # same name: rebuilt, not reused
    assert char.meta["tokenizer"]["kind"] == "char"
    assert bpe.meta["tokenizer"]["kind"] == "tiktoken"
    assert bpe.meta["train_tokens"] < char.meta["train_tokens"]
    decode = load_tokenizer(bpe.meta["tokenizer"]).decode
    ids = np.fromfile(bpe.split_path("val"), dtype=np.uint16).tolist()
    assert decode(ids) == corpus.read_text()[int(len(corpus.read_text()) * 0.9):]


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_training_and_sampling_on_bpe_tokens(shakespeare, tmp_path, data_root, bpe_cache):
    result = run_in_process(
        "nanogpt.train", *TINY_RUN, "dataset=shakespeare", f"dataset.source={shakespeare}",
        f"data_root={data_root}", "max_iters=2", "eval_interval=2", "hydra.run.dir=run", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "vocab 50257" in result.stdout
    sample = run_in_process("nanogpt.sample", "ckpt=run", "prompt=ROMEO:", "num_tokens=5", "device=cpu",
                            cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ROMEO:")


DOCUMENTS = [f"Document {i}: " + " ".join(["alpha", "beta", "γάμμα", "delta"][: 1 + i % 4]) * (1 + i % 7)
             for i in range(200)]


def split_documents(path) -> list[str]:
    """Decode a token file back into its documents, cutting at <|endoftext|>."""
    ids = np.fromfile(path, dtype=np.uint16).tolist()
    assert ids and ids[-1] == EOT, "every document ends in <|endoftext|>"
    encoding = tiktoken.get_encoding("gpt2")
    docs, current = [], []
    for token in ids:
        if token == EOT:
            docs.append(encoding.decode(current))
            current = []
        else:
            current.append(token)
    return docs


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_corpus_prep_writes_every_document_once_in_bpe(kind, tmp_path, data_root, bpe_cache):
    path = tmp_path / f"corpus.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCUMENTS)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": DOCUMENTS, "id": list(range(len(DOCUMENTS)))}), path)
    data = prepare_data("owt", str(path), data_root, val_fraction=0.05, tokenizer="gpt2", loader="hf",
                        num_proc=2)
    train, val = split_documents(data.split_path("train")), split_documents(data.split_path("val"))
    assert len(val) == 10 and len(train) == 190
    assert sorted(train + val) == sorted(DOCUMENTS)
    encoding = tiktoken.get_encoding("gpt2")
    total = sum(len(encoding.encode_ordinary(d)) + 1 for d in DOCUMENTS)
    assert data.meta["train_tokens"] + data.meta["val_tokens"] == total
    assert data.meta["documents"] == {"train": 190, "val": 10}
    # Prepared once: a second call reuses the files.
    before = os.stat(data.split_path("train")).st_mtime_ns
    again = prepare_data("owt", str(path), data_root, val_fraction=0.05, tokenizer="gpt2", loader="hf",
                        num_proc=2)
    assert os.stat(again.split_path("train")).st_mtime_ns == before


def test_openwebtext_and_fineweb_presets_prepare_a_local_corpus(tmp_path, data_root, bpe_cache):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    for preset in ("openwebtext", "fineweb"):
        result = run_in_process(
            "nanogpt.data", f"dataset={preset}", f"dataset.source={path}", "dataset.num_proc=2",
            f"data_root={data_root}", cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        meta = json.loads((data_root / preset / "meta.json").read_text())
        assert meta["documents"]["train"] + meta["documents"]["val"] == len(DOCUMENTS)


def test_corpus_with_a_wrong_text_field_is_one_error_line(tmp_path, data_root, bpe_cache):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCUMENTS[:5]))
    result = run_in_process(
        "nanogpt.data", "dataset=openwebtext", f"dataset.source={path}", f"data_root={data_root}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    # Before the error, datasets may have drawn its progress bars; the error is one line.
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: dataset.text_field='text' is not a column of " f"{path}; its columns are: body"
    ]
    assert not (data_root / "openwebtext" / "meta.json").exists()


def test_repo_has_the_bpe_dataset_presets():
    for name in ("shakespeare", "openwebtext", "fineweb"):
        assert (REPO / "conf" / "dataset" / f"{name}.yaml").is_file()
