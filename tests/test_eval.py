"""python -m nanogpt.eval: the exact loss over every non-overlapping window, checked independently."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from nanogpt.dataset.pipeline import prepare_data
from nanogpt.errors import DataError
from nanogpt.evaluation.loss import exact_loss
from nanogpt.model import GPT, GPTConfig

from .commands import run_in_process
from .test_load import transformers_model, write_meta_pkl, write_nanogpt_checkpoint, write_our_checkpoint


def reference_loss(forward, tokens: np.ndarray, block: int) -> tuple[float, int]:
    """Mean cross-entropy over windows i = 0 .. (N-1)//block - 1, one window at a time, in float64."""
    windows = (len(tokens) - 1) // block
    total = 0.0
    with torch.no_grad():
        for i in range(windows):
            x = torch.tensor(tokens[i * block: i * block + block], dtype=torch.long)[None]
            y = torch.tensor(tokens[i * block + 1: i * block + block + 1], dtype=torch.long)
            total += F.cross_entropy(forward(x)[0].double(), y, reduction="sum").item()
    return total / (windows * block), windows


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow  # whole commands: seconds to a minute of CPU (the quick tier keeps within 5 minutes)
def test_eval_of_our_run_matches_transformers_on_its_own_dataset(tmp_path, corpus, data_root):
    data = prepare_data("toy", str(corpus), data_root)
    config = GPTConfig(vocab_size=data.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    dataset = {"name": "toy", "source": str(corpus), "tokenizer": "char", "val_fraction": 0.1}
    model = write_our_checkpoint(tmp_path / "run" / "best.pt", config, data.meta["tokenizer"],
                                 {"dataset": dataset, "data_root": str(data_root)})
    result = run_in_process("nanogpt.eval", "ckpt=run", "device=cpu", "batch_size=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scored = last_json(result.stdout)

    tokens = np.fromfile(data.split_path("val"), dtype=np.uint16)
    hf = transformers_model(model.state_dict(), config)
    expected, windows = reference_loss(lambda x: hf(x).logits, tokens, 32)
    print(f"eval: {scored['loss']:.6f}, transformers: {expected:.6f} over {windows} windows")
    assert windows > 50 and windows % 5 != 0  # several batches, the last one short
    assert scored["split"] == "val" and scored["windows"] == windows and scored["tokens"] == windows * 32
    assert scored["loss"] == pytest.approx(expected, abs=1e-5)
    assert scored["perplexity"] == pytest.approx(math.exp(scored["loss"]))
    assert scored["bits_per_char"] == pytest.approx(scored["loss"] / math.log(2))

    # dataset=... names another dataset (here: the same text, scored on its train split).
    result = run_in_process("nanogpt.eval", "ckpt=run/best.pt", "device=cpu", "split=train", "dataset=text",
                            f"dataset.source={corpus}", "dataset.name=toy", f"data_root={data_root}",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train_tokens = np.fromfile(data.split_path("train"), dtype=np.uint16)
    assert last_json(result.stdout)["windows"] == (len(train_tokens) - 1) // 32


def test_eval_of_a_nanogpt_checkpoint_reads_the_tokens_beside_its_meta(tmp_path):
    weights = write_nanogpt_checkpoint(tmp_path / "out")
    data_dir = tmp_path / "data" / "shakespeare_char"
    write_meta_pkl(data_dir)
    tokens = np.random.default_rng(0).integers(0, 65, size=1000).astype(np.uint16)
    tokens.tofile(data_dir / "val.bin")
    result = run_in_process("nanogpt.eval", "ckpt=out", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scored = last_json(result.stdout)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, dropout=0.0)).eval()
    model.load_state_dict(weights)
    expected, windows = reference_loss(lambda x: model(x, x)[0], tokens, 32)
    assert (scored["windows"], scored["tokens"]) == (windows, windows * 32) == (31, 992)
    assert scored["loss"] == pytest.approx(expected, abs=1e-5)


def test_eval_without_a_dataset_to_score_is_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    result = run_in_process("nanogpt.eval", "ckpt=hf", "split=test", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: split='test' is not one of val, train"]
    result = run_in_process("nanogpt.eval", "ckpt=hf", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ckpt=hf does not say which dataset to score")


def test_exact_loss_batches_do_not_change_the_result_and_short_splits_are_refused():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    tokens = np.random.default_rng(1).integers(0, 20, size=8 * 13 + 1).astype(np.uint16)
    one, windows = exact_loss(model, tokens, 1, torch.device("cpu"), progress=False)
    many, _ = exact_loss(model, tokens, 4, torch.device("cpu"), progress=False)
    assert windows == 13 and one == pytest.approx(many, abs=1e-6)
    assert exact_loss(model, tokens[:-1], 4, torch.device("cpu"), progress=False)[1] == 12  # needs one more
    with pytest.raises(DataError, match="needs block_size \\+ 1 = 9"):
        exact_loss(model, tokens[:8], 4, torch.device("cpu"), progress=False)
