"""The exact loss of any checkpoint on a split: ``python -m nanogpt.eval ckpt=SOURCE [split=val]``.

Training reports a loss estimated on a few random batches, which is noisy
(README "Benchmarks": 1.886 estimated, 1.898 exact for the same model). This
scores every token of the split once: the split's N tokens are cut into
(N - 1) // block_size non-overlapping windows; window i reads
tokens[i*B : i*B + B] and predicts tokens[i*B + 1 : i*B + B + 1]. The result is
the mean cross-entropy over all of those predictions, in nats, summed in float64.

ckpt= takes everything nanogpt.load takes. The dataset is the checkpoint's own
(our runs record it; a karpathy/nanoGPT checkpoint's train.bin/val.bin sit
beside its meta.pkl) unless dataset=... says otherwise. The last line of
stdout is one JSON object, for scripts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING, DictConfig
from torch.nn import functional as F
from tqdm import tqdm

from nanogpt.cli import hydra_entry, to_dataclass
from nanogpt.config import DatasetConfig, DeviceConfig
from nanogpt.data import prepare_dataset
from nanogpt.device import autocast, resolve_device, resolve_dtype
from nanogpt.errors import ConfigError, DataError
from nanogpt.loading import LoadedSource, resolve_source
from nanogpt.model import GPT
from nanogpt.options import check_choices, option, require
from nanogpt.quantize import quantize_model, quantize_option

SPLITS = ("val", "train")


@dataclass
class EvalConfig:
    """Which model to score, on which tokens."""

    ckpt: str = option(MISSING, help="the model: a run dir or .pt file, nanoGPT's out_dir or ckpt.pt, "
                       "a Hugging Face directory, or gpt2 | gpt2-medium | gpt2-large | gpt2-xl")
    meta: str | None = option(None, help="karpathy/nanoGPT checkpoints: their meta.pkl, when it is not "
                              "data/<dataset>/meta.pkl under the current directory")
    dataset: DatasetConfig | None = option(None, help="the tokens to score (dataset=NAME); "
                                           "null: the dataset the checkpoint was trained on")
    data_root: str | None = option(None, help="where prepared datasets are cached; null: the checkpoint's "
                                   "own, else $NANOGPT_DATA_ROOT or ~/.cache/nanogpt")
    split: str = option("val", help="which split to score", choices=SPLITS)
    batch_size: int = option(8, help="windows per forward pass (memory, not the result)")
    quantize: str | None = quantize_option()
    device: DeviceConfig = option(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")


@dataclass
class TokenSplit:
    """A split's token ids and where they came from."""

    tokens: np.ndarray  # memory-mapped, uint16 or uint32 as the vocabulary needs
    tokenizer: dict  # the description of the tokenizer that made them
    where: Path


def dataset_tokens(cfg: EvalConfig, loaded: LoadedSource) -> TokenSplit:
    """The split to score: from dataset=..., else the checkpoint's own dataset."""
    default_root = os.environ.get("NANOGPT_DATA_ROOT", "~/.cache/nanogpt")
    if cfg.dataset is not None:
        return prepared_split(cfg.dataset, cfg.data_root or default_root, cfg.split)
    recorded = loaded.config.get("dataset")
    if loaded.kind == "run" and isinstance(recorded, dict):
        known = {f.name for f in dataclasses.fields(DatasetConfig)}
        dataset = DatasetConfig(**{k: v for k, v in recorded.items() if k in known})
        data_root = cfg.data_root or loaded.config.get("data_root") or default_root
        return prepared_split(dataset, data_root, cfg.split)
    if loaded.kind == "nanoGPT" and loaded.data_dir is not None:
        path = loaded.data_dir / f"{cfg.split}.bin"  # nanoGPT's prepare.py writes it beside meta.pkl
        if path.is_file():
            return TokenSplit(np.memmap(path, dtype=np.uint16, mode="r"), loaded.tokenizer, path)
    raise ConfigError(
        f"ckpt={cfg.ckpt} does not say which dataset to score; give dataset=NAME "
        "(e.g. dataset=shakespeare_char, or dataset=text dataset.source=FILE dataset.name=NAME)"
    )


def prepared_split(dataset: DatasetConfig, data_root: str, split: str) -> TokenSplit:
    """A split of a dataset prepared (once, into the shared cache) as training prepares it."""
    data = prepare_dataset(dataset, Path(data_root).expanduser())
    return TokenSplit(data.tokens(split), data.meta["tokenizer"], data.split_path(split))


@torch.no_grad()
def exact_loss(model: GPT, tokens: np.ndarray, batch_size: int, device: torch.device,
               dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[float, int]:
    """(mean cross-entropy in nats, number of windows) over all non-overlapping block_size windows."""
    block = model.config.block_size
    windows = (len(tokens) - 1) // block
    if windows < 1:
        raise DataError(f"the split has {len(tokens)} tokens; scoring needs block_size + 1 = {block + 1}")
    total = 0.0
    bar = tqdm(total=windows, desc="eval", unit="window", disable=None if progress else True)
    for first in range(0, windows, batch_size):
        count = min(batch_size, windows - first)
        # count windows and the one token after them: inputs and targets are the same ids shifted by one.
        ids = tokens[first * block: (first + count) * block + 1].astype(np.int64)
        chunk = torch.from_numpy(ids).to(device)
        inputs, targets = chunk[:-1].view(count, block), chunk[1:].view(count, block)
        with autocast(device, dtype):
            logits, _ = model(inputs, targets)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        bar.update(count)
    bar.close()
    return total / (windows * block), windows


def evaluate(cfg: EvalConfig) -> dict:
    """Score cfg.ckpt on cfg.split; the JSON-ready result."""
    device = resolve_device(cfg.device.name)
    dtype = resolve_dtype(cfg.device.dtype, device)
    loaded = resolve_source(cfg.ckpt, key="ckpt", meta=cfg.meta)
    split = dataset_tokens(cfg, loaded)
    if split.tokenizer != loaded.tokenizer:
        raise ConfigError(
            f"ckpt={cfg.ckpt} uses tokenizer {describe(loaded.tokenizer)} but {split.where} was made with "
            f"{describe(split.tokenizer)}; pick a dataset with the model's tokenizer"
        )
    model = quantize_model(loaded.model.to(device).eval(), cfg.quantize, device)
    loss, windows = exact_loss(model, split.tokens, cfg.batch_size, device, dtype)
    result = {
        "ckpt": str(cfg.ckpt), "tokens_file": str(split.where), "split": cfg.split, "loss": loss,
        "perplexity": math.exp(loss), "tokens": windows * model.config.block_size, "windows": windows,
    }
    if loaded.tokenizer.get("kind") == "char":
        result["bits_per_char"] = loss / math.log(2)  # one token is one character
    return result


def describe(tokenizer: dict) -> str:
    """A short name for a tokenizer description, for messages."""
    if tokenizer.get("kind") == "char":
        return f"char ({len(tokenizer['vocabulary'])} characters)"
    return f"{tokenizer.get('kind')} {tokenizer.get('encoding', '')}".strip()


@hydra_entry("eval", schema=EvalConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: score the checkpoint and print the result, JSON on the last line."""
    result = evaluate(to_dataclass(cfg, EvalConfig))
    print(f"{result['split']} loss {result['loss']:.4f} (perplexity {result['perplexity']:.3f}) over "
          f"{result['windows']:,} windows, {result['tokens']:,} tokens of {result['tokens_file']}",
          file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
