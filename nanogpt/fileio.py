"""Files: written whole or not at all, checked by their sha256, and the package's own folders."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """A top-level folder of the repository (conf, experiments), or its copy inside an installed wheel."""
    inside_package = PACKAGE_DIR / name
    return inside_package if inside_package.is_dir() else PACKAGE_DIR.parent / name


def sha256_of_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside dest, then rename it into place.

    Readers see either the old file or the complete new one, never a partial
    one; if write fails, the temporary file is removed and dest is untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes owner-only files; give the result the permissions a plain open() would.
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
