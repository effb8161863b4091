"""Preparing a dataset once into the shared cache: ``prepare_dataset`` for every source.

Prepared data is a shared cache, not part of a run: each dataset lives in
``data_root/<name>/`` as ``train.bin`` and ``val.bin`` (token ids, uint16 while
the vocabulary fits, else uint32) plus ``meta.json`` (tokenizer, dtype, sizes,
where the text came from). prepare_dataset() works under a file lock, so
concurrent jobs prepare once; skips the work while the source and the settings
are unchanged; and writes meta.json last, so its presence means complete. How
each kind of source is read is its Source class's business (sources.py).
Nothing here imports Hydra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock

from nanogpt.dataset.batches import PreparedData
from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.sources import TextSource, open_source
from nanogpt.dataset.tokenizers import OWN_TOKENIZERS, tokenizer_description
from nanogpt.errors import DataError
from nanogpt.fileio import resource_dir, write_atomically

log = logging.getLogger("nanogpt.data")

# Bumped whenever the prepared format changes, so old caches are rebuilt (2: dtype in meta.json).
PREPARED_FORMAT = 2
PRODUCTS = ("meta.json", "train.bin", "val.bin", "input.txt")  # removed if a preparation fails


def prepare_dataset(config: DatasetConfig, data_root: Path | str,
                    model_tokenizer: dict | None = None) -> PreparedData:
    """Prepare what a DatasetConfig describes, once; concurrent callers wait on a lock.

    The cache is reused while the source (a URL's address and checksum, a local
    file's size and modification time) and every setting are unchanged; a
    preparation that fails leaves none of its files behind. model_tokenizer is
    the tokenizer of the model the data is for (model.init_from's), which
    instruction data (dataset=sft) is encoded with.
    """
    source = open_source(config)
    # A tokenizer that needs no training is checked (file parses, encoding loads) before any work.
    named = None if config.tokenizer in OWN_TOKENIZERS else tokenizer_description(config.tokenizer)
    named = source.encoding_tokenizer(config, named, model_tokenizer)
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
            made = source.prepare(config, directory, named, config.num_proc or os.cpu_count() or 1)
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


# The names of the first version of this project, kept for scripts and notebooks that use them.


def prepare_data(name: str, source: str, data_root: Path, sha256: str | None = None,
                 val_fraction: float = 0.1, tokenizer: str = "char", **settings) -> PreparedData:
    """Prepare a dataset once: source -> train.bin, val.bin, meta.json.

    settings are the other DatasetConfig fields (loader, vocab_size, num_proc, ...);
    they are checked exactly as a composed config is.
    """
    config = DatasetConfig(name=name, source=source, sha256=sha256, val_fraction=val_fraction,
                           tokenizer=tokenizer, **settings)
    return prepare_dataset(config, data_root)


def download_shakespeare(dest: Path, source: str | None = None, sha256: str | None = None) -> Path:
    """Fetch Tiny Shakespeare (1,115,394 characters) to dest, from a URL or a local copy.

    Its address and checksum are declared once, in conf/dataset/shakespeare_char.yaml
    (where NANOGPT_SHAKESPEARE_SOURCE can replace the address); they are read from there,
    with OmegaConf, which resolves that variable as the command line would.
    """
    from omegaconf import OmegaConf

    preset = OmegaConf.load(resource_dir("conf") / "dataset" / "shakespeare_char.yaml")
    TextSource(source or preset.source, sha256 or preset.sha256).fetch(Path(dest))
    return Path(dest)
