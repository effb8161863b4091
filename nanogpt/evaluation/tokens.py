"""Which tokens to score a model on: a split of the dataset it was trained on, or of one named.

The dataset a run was trained on is read exactly as it was: its checkpoint
records the cache folder and the sha256 of its tokens, and the cache is used
only while it still holds them (pipeline.recorded_dataset), never prepared over
with other data that another run may be reading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanogpt.dataset.batches import PreparedData
from nanogpt.dataset.config import DatasetConfig, default_data_root
from nanogpt.dataset.pipeline import prepare_dataset, recorded_dataset
from nanogpt.errors import ConfigError
from nanogpt.text.tokenizers import Tokenizer
from nanogpt.weights.loading import LoadedSource


@dataclass
class TokenSplit:
    """A split's token ids and where they came from."""

    tokens: np.ndarray  # memory-mapped, uint16 or uint32 as the vocabulary needs
    tokenizer: Tokenizer  # the tokenizer that made them
    where: Path
    data: PreparedData | None = None  # the prepared dataset, when the split is one of ours


def dataset_tokens(loaded: LoadedSource, split: str, dataset: DatasetConfig | None = None,
                   data_root: str | None = None, key: str = "ckpt") -> TokenSplit:
    """The split to score: of dataset (prepared in data_root), else the dataset the model was trained on.

    data_root None: the run's own, else the default (default_data_root).
    """
    if dataset is not None:
        return prepared_split(dataset, data_root or default_data_root(), split, loaded.tokenizer)
    recorded = loaded.config.get("dataset")
    if loaded.kind == "run" and isinstance(recorded, dict):
        known = {f.name for f in dataclasses.fields(DatasetConfig)}
        dataset = DatasetConfig(**{k: v for k, v in recorded.items() if k in known})
        data_root = data_root or loaded.config.get("data_root") or default_data_root()
        data = recorded_dataset(dataset, Path(data_root).expanduser(), loaded.trained_on, loaded.tokenizer)
        return TokenSplit(data.tokens(split), data.tokenizer, data.split_path(split), data)
    if loaded.kind == "nanoGPT" and loaded.data_dir is not None:
        path = loaded.data_dir / f"{split}.bin"  # nanoGPT's prepare.py writes it beside meta.pkl
        if path.is_file():
            return TokenSplit(np.memmap(path, dtype=np.uint16, mode="r"), loaded.tokenizer, path)
    raise ConfigError(
        f"{key}={loaded.where} does not say which dataset to score; give dataset=NAME "
        "(e.g. dataset=shakespeare_char, or dataset=text dataset.source=FILE dataset.name=NAME)"
    )


def prepared_split(dataset: DatasetConfig, data_root: str, split: str,
                   model_tokenizer: Tokenizer) -> TokenSplit:
    """A split of a dataset prepared (once, into the shared cache) as training prepares it for the model."""
    data = prepare_dataset(dataset, Path(data_root).expanduser(), model_tokenizer)
    return TokenSplit(data.tokens(split), data.tokenizer, data.split_path(split), data)
