"""The exact loss of any checkpoint on a split: ``python -m nanogpt.eval ckpt=SOURCE [split=val]``.

Every token of the split is scored once (nanogpt/evaluation/loss.py). ckpt=
takes everything nanogpt.load takes. The dataset is the checkpoint's own
(our runs record it; a karpathy/nanoGPT checkpoint's train.bin/val.bin sit
beside its meta.pkl) unless dataset=... says otherwise. The last line of
stdout is one JSON object, for scripts.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

from omegaconf import MISSING, DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.tokenizers import tokenizer_name
from nanogpt.errors import ConfigError
from nanogpt.evaluation.loss import exact_loss
from nanogpt.evaluation.tokens import dataset_tokens
from nanogpt.options import check_choices, option, require
from nanogpt.runtime.device import DeviceConfig, resolve_device, resolve_dtype
from nanogpt.weights.loading import require_source_packages, resolve_source
from nanogpt.weights.quantize import quantize_model, quantize_option

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
                                   "own, else the default (data_root of nanogpt.train --help)")
    split: str = option("val", help="which split to score", choices=SPLITS)
    batch_size: int = option(8, help="windows per forward pass (memory, not the result)")
    quantize: str | None = quantize_option()
    device: DeviceConfig = option(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")

    def require_packages(self) -> None:
        require_source_packages(self.ckpt)


def evaluate(cfg: EvalConfig) -> dict:
    """Score cfg.ckpt on cfg.split; the JSON-ready result."""
    device = resolve_device(cfg.device.name)
    dtype = resolve_dtype(cfg.device.dtype, device)
    loaded = resolve_source(cfg.ckpt, key="ckpt", meta=cfg.meta)
    split = dataset_tokens(loaded, cfg.split, cfg.dataset, cfg.data_root)
    if split.tokenizer != loaded.tokenizer:
        raise ConfigError(
            f"ckpt={cfg.ckpt} uses tokenizer {tokenizer_name(loaded.tokenizer)} but {split.where} was made "
            "with "
            f"{tokenizer_name(split.tokenizer)}; pick a dataset with the model's tokenizer"
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


@hydra_entry("eval", EvalConfig)
def main(cfg: DictConfig) -> None:
    """Entry point: score the checkpoint and print the result, JSON on the last line."""
    result = evaluate(to_dataclass(cfg, EvalConfig))
    print(f"{result['split']} loss {result['loss']:.4f} (perplexity {result['perplexity']:.3f}) over "
          f"{result['windows']:,} windows, {result['tokens']:,} tokens of {result['tokens_file']}",
          file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
