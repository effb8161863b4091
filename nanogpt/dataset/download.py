"""Bringing a dataset's text local: downloads and joined local files, each checked by its sha256.

A file appears at its destination only once it is complete and verified, so a
cut or killed download is never used.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from nanogpt.errors import DataError, first_line
from nanogpt.fileio import sha256_of_file, write_atomically

if TYPE_CHECKING:
    import requests


def is_url(source: str) -> bool:
    """True for an http(s) address, False for a local path."""
    return source.startswith(("http://", "https://"))


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0,
             retries: int = 3) -> Path:
    """Download url to dest with retries, a progress bar and an optional sha256 check.

    The file appears at dest only once it is complete and verified.
    """
    # Imported here, not above: requests and urllib3 take 0.15 s to import, and every command
    # imports this module (for is_url) while few of them download anything.
    import requests
    from requests.adapters import HTTPAdapter
    from tqdm import tqdm
    from urllib3.util.retry import Retry

    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retries are not news; failure is
    session = requests.Session()
    retry = Retry(total=retries, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))

    def fetch(tmp: Path) -> None:
        with session.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with open(tmp, "wb") as f, tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=None
            ) as bar:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        check_sha256(tmp, sha256, url)

    try:
        write_atomically(dest, fetch)
    except requests.RequestException as e:
        raise DataError(
            f"could not download {url} ({describe_request_error(e)}); check the address, or point "
            "dataset.source at a local copy of the file"
        ) from None
    return dest


def describe_request_error(error: requests.RequestException) -> str:
    """A few words on why a request failed, with what the network library said (why it could not connect)."""
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code}"
    if isinstance(error, requests.Timeout):
        words = "timed out"
    elif isinstance(error, requests.ConnectionError):
        words = "could not connect"
    else:
        words = type(error).__name__
    # urllib3 wraps the cause: MaxRetryError(reason=NewConnectionError("HTTPConnection(...): Failed to ...")).
    reason = getattr(error.args[0], "reason", None) if error.args else None
    # The connection's repr before the message ("HTTPConnection(host=..., port=...): ") says nothing new.
    said = first_line(str(reason if reason is not None else error)).split("): ", 1)[-1]
    return f"{words}: {said}" if said else words


def check_sha256(path: Path, expected: str | None, source: str, actual: str | None = None) -> None:
    """Raise DataError if path's sha256 differs from expected (None skips the check)."""
    if expected is None:
        return
    actual = actual or sha256_of_file(path)
    if actual != expected:
        raise DataError(
            f"{source} has sha256 {actual}, expected {expected}; the file is not the known "
            "dataset (set dataset.sha256=null to accept a different text)"
        )


def copy_and_hash(files: list[Path], dest: Path, expected: str | None, source: str) -> str:
    """Join files into dest and return the sha256 of the result, reading each byte once.

    dest appears only if the checksum is the expected one (or none is expected).
    """
    digest = hashlib.sha256()

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for file in files:
                with open(file, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        check_sha256(tmp, expected, source, actual=digest.hexdigest())

    write_atomically(dest, join)
    return digest.hexdigest()
