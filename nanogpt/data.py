"""Prepare a dataset without training: ``python -m nanogpt.data dataset=NAME [dataset.KEY=VALUE ...]``.

The work is nanogpt/dataset's (prepare_dataset); this command composes the
``dataset`` options and says where the tokens went. The names of the first
version of this project (download_shakespeare, get_vocabulary,
create_encoder_decoder, prepare_data) are importable from here too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.dataset.config import DatasetConfig, data_root_option
from nanogpt.dataset.pipeline import download_shakespeare, prepare_data, prepare_dataset
from nanogpt.dataset.tokenizers import create_encoder_decoder, get_vocabulary
from nanogpt.options import option

__all__ = ["DataConfig", "create_encoder_decoder", "download_shakespeare", "get_vocabulary", "main",
           "prepare_data"]


@dataclass
class DataConfig:
    """Preparing a dataset without training."""

    dataset: DatasetConfig = option(default_factory=DatasetConfig)
    data_root: str = data_root_option()


@hydra_entry("data", DataConfig)
def main(cfg: DictConfig) -> None:
    """Prepare the composed dataset and say where it went."""
    config = to_dataclass(cfg, DataConfig)
    started = time.perf_counter()
    data = prepare_dataset(config.dataset, Path(config.data_root))
    print(
        f"{config.dataset.name}: {data.meta['train_tokens']:,} train and "
        f"{data.meta['val_tokens']:,} val tokens, vocabulary {data.vocab_size} "
        f"({data.meta['dtype']}), in {data.directory} ({time.perf_counter() - started:.1f} s)"
    )


if __name__ == "__main__":
    main()
