"""Preparing a dataset once into the shared cache, and finding the exact data a run trained on.

Prepared data is a shared cache, not part of a run: each dataset lives in
``data_root/<name>/`` (DatasetConfig names the folder) as ``train.bin`` and
``val.bin`` (token ids, uint16 while the vocabulary fits, else uint32) plus
``meta.json`` (tokenizer, dtype, sizes, where the text came from, and the
sha256 of each token file). prepare_dataset() works under the folder's file
lock, so concurrent jobs prepare once and a job preparing other data into a
named folder waits for the one before it; it skips the work while the source
and the settings are unchanged. How each kind of source is read is its Source
class's business (sources.py). Nothing here imports Hydra.

Nothing half-made is ever read, and nothing good is lost:

* A preparation writes into ``<folder>/.preparing/`` and moves its files into
  place only once all are written (meta.json last, so its presence means
  complete). If it fails (a bad source, a full disk, a kill), the cache it was
  to replace is still there, whole.
* Readers open the token files while they hold the lock, so they see one
  complete preparation. A later preparation renames new files over them, which
  leaves the files a running job has open (memory-mapped) as they were: a run
  reads, to its end, the tokens it started with.
* A folder that holds files but no preparation's meta.json is the user's, and
  is refused (check_cache_folder); a preparation that fails in a folder it
  made removes the folder again, lock file and all (locked_cache).
* A run's checkpoints record which data it trained on (data_record: the folder
  and the token files' sha256). recorded_dataset() gives back exactly those
  tokens to eval and resume, or says why it cannot; it never re-prepares a
  folder that holds other tokens, which another run may be reading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock

from nanogpt.dataset.batches import PreparedData
from nanogpt.dataset.config import DatasetConfig
from nanogpt.dataset.preference import PreferenceSource
from nanogpt.dataset.prompts import PromptSource
from nanogpt.dataset.sft import SftSource
from nanogpt.dataset.sources import BinSource, DocumentSource, Source, TextSource
from nanogpt.errors import DataError, WriteFailed
from nanogpt.fileio import describe_names, folders_to_make, remove_if_empty, sha256_of_file, write_atomically
from nanogpt.text.tokenizers import OWN_TOKENIZERS, Tokenizer, named_tokenizer

log = logging.getLogger("nanogpt.data")

# Bumped whenever the prepared format changes, so old caches are rebuilt (2: dtype in meta.json).
PREPARED_FORMAT = 2
PRODUCTS = ("meta.json", "train.bin", "val.bin", "input.txt")  # what a preparation puts in the folder
STAGING = ".preparing"  # where a preparation writes, inside the folder (same file system: renames)
LOCK_FILE = ".lock"  # inside the folder: one preparation at a time, and readers see a whole one
SPLITS = ("train", "val")
# The class that prepares each dataset.loader (config.py's LOADERS says what each reads).
SOURCES: dict[str, type[Source]] = {"text": TextSource, "hf": DocumentSource, "bin": BinSource,
                                    "sft": SftSource, "preference": PreferenceSource, "prompts": PromptSource}


def prepare_dataset(config: DatasetConfig, data_root: Path | str,
                    model_tokenizer: Tokenizer | None = None) -> PreparedData:
    """Prepare what a DatasetConfig describes, once; concurrent callers wait on a lock.

    The cache is reused while the source (a URL's address and checksum, a local
    file's size and modification time) and every setting are unchanged; a
    preparation that fails leaves the folder as it was. model_tokenizer is
    the tokenizer of the model the data is for (model.init_from's), which
    instruction data (dataset=sft) is encoded with.
    """
    source, named, settings = plan(config, model_tokenizer)
    directory = cache_directory(config, data_root)
    with locked_cache(directory, data_root):
        meta = current_meta(directory, settings)
        if meta is None:
            meta = prepare_into(directory, config, source, named, settings)
        return opened(directory, with_hashes(directory, meta))


def recorded_dataset(config: DatasetConfig, data_root: Path | str, record: dict | None,
                     model_tokenizer: Tokenizer | None = None) -> PreparedData:
    """The data a run trained on, for eval and resume: exactly those tokens, or a DataError saying why not.

    record is what the run's checkpoint holds (data_record), None for checkpoints
    older than it, whose data is recognised by its source and settings instead.
    A folder that holds those tokens is read as it is (its source may be gone);
    one that is missing is prepared again from the recorded source and checked;
    one that holds other tokens is left alone. model_tokenizer is as for prepare_dataset.
    """
    directory = cache_directory(config, data_root)
    with locked_cache(directory, data_root):
        meta = complete_meta(directory)
        if meta is None:  # never prepared here, or removed: nobody is reading it
            try:
                source, named, settings = plan(config, model_tokenizer)
            except DataError as error:
                raise DataError(f"{directory}, the data this run trained on, is not there and cannot be "
                                f"prepared again: {error}") from None
            meta = prepare_into(directory, config, source, named, settings)
            if record is not None and meta["tokens_sha256"] != record.get("tokens_sha256"):
                raise DataError(f"{directory} was prepared again from {config.source}, but the tokens differ "
                                "from those the run trained on: the source has changed since")
            return opened(directory, meta)
        if record is not None:
            meta = with_hashes(directory, meta)
            if meta["tokens_sha256"] != record.get("tokens_sha256"):
                raise DataError(other_tokens(directory, meta, "its token files' sha256 differ from those "
                                                              "the run's checkpoint records"))
        elif not same_source(meta, config) and current_meta(directory,
                                                            plan(config, model_tokenizer)[2]) is None:
            raise DataError(other_tokens(directory, meta, "it was prepared from another source or with "
                                                          "other settings"))
        return opened(directory, meta)


def data_record(data: PreparedData) -> dict:
    """What a checkpoint records of the data its run trained on: the folder and its tokens' sha256."""
    return {"directory": str(data.directory.resolve()), "name": data.directory.name,
            "tokens_sha256": data.meta["tokens_sha256"]}


def other_tokens(directory: Path, meta: dict, why: str) -> str:
    """Why a cache folder is not the data a run trained on, and what to do instead."""
    return (f"{directory} now holds other tokens than this run trained on ({why}; they were prepared from "
            f"{meta.get('source')}) and is left as it is, as another run may be using them; to prepare this "
            "run's data again, give it a folder of its own: dataset.name=NEW")


def plan(config: DatasetConfig,
         model_tokenizer: Tokenizer | None = None) -> tuple[Source, Tokenizer | None, dict]:
    """(source, the tokenizer to encode with if not the data's own, settings that decide the tokens).

    Checked before any work. The settings are the cache's fingerprint, so the
    tokenizer enters them as its stored description (hashed), never as an object.
    """
    source = SOURCES[config.loader].from_config(config)
    # A tokenizer that needs no training is checked (file parses, encoding loads) before any work.
    named = None if config.tokenizer in OWN_TOKENIZERS else named_tokenizer(config.tokenizer)
    encoding = source.encoding_tokenizer(config, named, model_tokenizer)
    settings = {**asdict(config), "format": PREPARED_FORMAT, "source": source.fingerprint()}
    settings.pop("num_proc")  # how many processes worked changes nothing in the result
    if encoding != named:  # the base model's tokenizer decides the ids (sft), e.g. its characters
        settings["model_tokenizer_sha256"] = hashlib.sha256(encoding.key.encode()).hexdigest()
    named = encoding
    if named is not None and named.kind == "hf":
        # The file's content, not its path, decides the ids: an edited tokenizer.json rebuilds.
        settings["tokenizer_sha256"] = hashlib.sha256(named.description["json"].encode()).hexdigest()
    return source, named, settings


def cache_directory(config: DatasetConfig, data_root: Path | str) -> Path:
    """The dataset's cache folder (locked_cache makes it)."""
    return Path(data_root).expanduser() / config.name


@contextlib.contextmanager
def locked_cache(directory: Path, data_root: Path | str) -> Iterator[None]:
    """Hold the cache folder's lock, making the folder if needed; a refusal leaves the disk as it found it.

    If what runs under the lock fails, a lock file made here is removed (while
    still held: a process waiting on it finds it unlinked once it gets it, as
    filelock checks, and starts again), and so is the folder, with any folders
    made for it, if this made it and nothing else is in it.
    """
    while True:
        made = folders_to_make(directory)
        had_lock_file = (directory / LOCK_FILE).exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(directory / LOCK_FILE))
            lock.acquire()
            break
        except FileNotFoundError:  # removed by a preparation that failed while this one waited: again
            continue
        except OSError as e:
            raise DataError(f"data_root={data_root}: cannot create {directory} ({e.strerror}); give a "
                            "writable directory") from None
    try:
        yield
    except BaseException:
        if not had_lock_file:
            (directory / LOCK_FILE).unlink(missing_ok=True)
            remove_if_empty(made)
        raise
    finally:
        lock.release()


def check_cache_folder(directory: Path) -> None:
    """Refuse to prepare into a folder that holds files but no preparation of ours: they are the user's.

    A preparation writes train.bin, val.bin, meta.json and input.txt there and
    removes those of an earlier preparation; in a folder of the user's they
    would replace files of those names.
    """
    contents = sorted(set(os.listdir(directory)) - {LOCK_FILE, STAGING})
    if contents and not is_prepared_folder(directory):
        raise DataError(f"{directory} already holds {describe_names(contents)}, which no preparation wrote; "
                        "prepared data gets a folder of its own: give another dataset.name (or data_root)")


def is_prepared_folder(directory: Path) -> bool:
    """True when directory holds a meta.json that a preparation wrote (any format, complete or not)."""
    try:
        meta = read_meta(directory)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and ("format" in meta or "train_tokens" in meta)


def prepare_into(directory: Path, config: DatasetConfig, source: Source, named: Tokenizer | None,
                 settings: dict) -> dict:
    """Prepare config's data in a staging folder, then move it into directory (locked); its meta.json."""
    check_cache_folder(directory)
    staging = directory / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a preparation that was killed
    staging.mkdir()
    try:
        if (directory / "input.txt").is_file():  # a download kept: the source may reuse it (TextSource.fetch)
            with contextlib.suppress(OSError):
                os.link(directory / "input.txt", staging / "input.txt")
        made = source.prepare(config, staging, named, config.num_proc or os.cpu_count() or 1)
        meta = {"format": PREPARED_FORMAT, "name": config.name, "source": config.source,
                "val_fraction": config.val_fraction, **made, "tokens_sha256": token_hashes(staging),
                "settings": settings}
        write_atomically(staging / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        # Renames only from here (no write can fail for want of space); meta.json goes last: its
        # presence says the token files are complete.
        (directory / "meta.json").unlink(missing_ok=True)
        for name in PRODUCTS[1:]:
            if not (staging / name).exists():
                (directory / name).unlink(missing_ok=True)  # a product of the data this replaces
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "meta.json"):
            os.replace(item, directory / item.name)
    except WriteFailed as error:  # said of the cache, not of the staging folder it never sees
        raise WriteFailed(f"could not prepare {directory}: {error.reason} ({error.free}); the cache there is "
                          "as it was. Free some space (or choose another data_root) and run again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("prepared %s into %s", config.name, directory)
    return meta


def token_hashes(directory: Path) -> dict[str, str]:
    """The sha256 of each split's token file: what identifies a preparation's tokens."""
    return {split: sha256_of_file(directory / f"{split}.bin") for split in SPLITS}


def with_hashes(directory: Path, meta: dict) -> dict:
    """The meta with its token files' sha256, added to meta.json where an older preparation lacks them."""
    if "tokens_sha256" in meta:
        return meta
    log.info("hashing the token files of %s (once)", directory)
    meta = {**meta, "tokens_sha256": token_hashes(directory)}
    write_atomically(directory / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return meta


def opened(directory: Path, meta: dict) -> PreparedData:
    """The prepared data with its token files memory-mapped now, while the cache is locked."""
    data = PreparedData(directory, meta)
    data.opened = {split: data.tokens(split) for split in SPLITS}
    return data


def same_source(meta: dict, config: DatasetConfig) -> bool:
    """True when a folder prepared by an older version holds config's source with config's tokenizer settings.

    Checkpoints from before data_record name their data only by its config; an
    older preparation recorded a relative source path, so the paths are compared
    resolved.
    """
    old = meta.get("settings") or {}
    keys = ("tokenizer", "vocab_size", "val_fraction", "loader", "subset", "text_field")
    if any(old.get(key) != getattr(config, key) for key in keys if key in old):
        return False
    recorded = str(meta.get("source"))
    return recorded == config.source or Path(recorded).expanduser().resolve() == Path(config.source).resolve()


def read_meta(directory: Path) -> dict:
    """Load a prepared dataset's meta.json."""
    return json.loads((directory / "meta.json").read_text())


def complete_meta(directory: Path) -> dict | None:
    """The cache's meta.json when its token files are all there, else None."""
    try:
        meta = read_meta(directory)
    except (OSError, ValueError):
        return None
    return meta if all((directory / f"{split}.bin").exists() for split in SPLITS) else None


def current_meta(directory: Path, settings: dict) -> dict | None:
    """The cache's meta.json when it holds this source prepared with these settings, else None."""
    meta = complete_meta(directory)
    return meta if meta is not None and meta.get("settings") == json.loads(json.dumps(settings)) else None


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
