"""Files: written whole or not at all, checked by their sha256, and the package's own folders."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from nanogpt.errors import WriteFailed

PACKAGE_DIR = Path(__file__).resolve().parent
# What a file system says when it will not take the bytes, whichever file they were for.
REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


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
    A write the file system refuses (no space left, quota, read-only, or any
    OSError about the temporary file or its folder) becomes WriteFailed: one line
    naming dest and the space left there. Other errors of write (a download cut
    short, a source that cannot be read) pass through as they are.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as error:
        raise write_failed(dest, error) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes owner-only files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~current_umask())
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as error:
        about_this_file = error.filename is not None and Path(error.filename) in (tmp, dest, dest.parent)
        if error.errno not in REFUSED_WRITES and not about_this_file:
            raise
        tmp.unlink(missing_ok=True)  # first, so the space it held counts as free in the message
        raise write_failed(dest, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_failed(dest: Path, error: OSError) -> WriteFailed:
    """The one-line report of a refused write: what, why, and how much room is left where."""
    try:
        free = f"{format_bytes(shutil.disk_usage(dest.parent).free)} free there"
    except OSError:
        free = "free space unknown"
    reason = error.strerror or str(error) or type(error).__name__
    kept = f"the previous {dest.name} is unchanged" if dest.exists() else f"no {dest.name} was written"
    failed = WriteFailed(f"could not write {dest}: {reason} ({free}); {kept}. Free some space "
                         "(or choose another directory) and run again")
    failed.reason, failed.free = reason, free  # for callers that say it in their own terms
    return failed


def format_bytes(size: int) -> str:
    """A byte count as people read it: 512 B, 3.4 MB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"  # not reached
