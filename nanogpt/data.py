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

from omegaconf import DictConfig, OmegaConf

from nanogpt.cli.entry import hydra_entry, to_dataclass
from nanogpt.dataset.config import DatasetConfig, data_root_option
from nanogpt.dataset.pipeline import prepare_data, prepare_dataset
from nanogpt.dataset.sources import TextSource
from nanogpt.fileio import resource_dir
from nanogpt.options import option
from nanogpt.text.tokenizers import create_encoder_decoder, get_vocabulary

__all__ = ["DataConfig", "create_encoder_decoder", "download_shakespeare", "get_vocabulary", "main",
           "prepare_data"]


@dataclass
class DataConfig:
    """Preparing a dataset without training."""

    dataset: DatasetConfig = option(default_factory=DatasetConfig)
    data_root: str = data_root_option()


def download_shakespeare(dest: Path, source: str | None = None, sha256: str | None = None) -> Path:
    """Fetch Tiny Shakespeare (1,115,394 characters) to dest, from a URL or a local copy.

    Its address and checksum are declared once, in conf/dataset/shakespeare_char.yaml
    (where NANOGPT_SHAKESPEARE_SOURCE can replace the address); OmegaConf reads them
    from there and resolves that variable as the command line would.
    """
    preset = OmegaConf.load(resource_dir("conf") / "dataset" / "shakespeare_char.yaml")
    TextSource(source or preset.source, sha256 or preset.sha256).fetch(Path(dest))
    return Path(dest)


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
