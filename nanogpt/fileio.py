"""Files: written whole or not at all, never over a user's, checked by their sha256; the package's folders.

A user's files are sacred: a command replaces only what a command of ours
wrote. Where its files go into a folder that may hold other things (an export's
directory, a report's tables beside a user's runs), it records what it wrote
in that folder's WRITTEN_FILE, each file with its size and modification time as
it left it, and a later command replaces a file only while it is still that
one; anything else is refused before any work, naming what is there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from nanogpt.errors import UserError, WriteFailed

PACKAGE_DIR = Path(__file__).resolve().parent
# What a file system says when it will not take the bytes, whichever file they were for.
REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
WRITTEN_FILE = ".nanogpt-written.json"  # in a folder: the files our commands wrote there (see above)
LISTED = 5  # names a refusal lists before "and N more"


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


class OnDemand(Mapping):
    """Values by name, each read (by read(name)) when it is looked up, and not kept: a checkpoint's tensors.

    A reader then holds one of them at a time, however many the file has.
    """

    def __init__(self, names: Iterable[str], read: Callable[[str], object]):
        self.names, self.read = dict.fromkeys(names), read  # in order, found at once

    def __getitem__(self, name: str) -> object:
        if name not in self.names:
            raise KeyError(name)
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def permit_as_open_would(path: Path) -> None:
    """Give path the permissions a plain open() (a file) or mkdir() (a folder) would have given it.

    Temporary files and folders (mkstemp, mkdtemp) are made owner-only, and so
    are the files some libraries write through them (safetensors' weights); what
    we move into place is readable like its neighbours, as the umask allows.
    """
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


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
        permit_as_open_would(tmp)  # mkstemp makes owner-only files
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


def write_failed(dest: Path, error: OSError, appending: bool = False) -> WriteFailed:
    """The one-line report of a refused write: what, why, and how much room is left where.

    appending: the write was to add to dest (a log, metrics.jsonl), which keeps what it held before.
    """
    try:
        free = f"{format_bytes(shutil.disk_usage(dest.parent).free)} free there"
    except OSError:
        free = "free space unknown"
    reason = error.strerror or str(error) or type(error).__name__
    if appending:
        what, kept = f"add to {dest}", "what it held before is kept"
    else:
        what = f"write {dest}"
        kept = f"the previous {dest.name} is unchanged" if dest.exists() else f"no {dest.name} was written"
    failed = WriteFailed(f"could not {what}: {reason} ({free}); {kept}. Free some space "
                         "(or choose another directory) and run again")
    failed.reason, failed.free = reason, free  # for callers that say it in their own terms
    return failed


def is_refused_write(error: BaseException) -> bool:
    """True for an OSError by which the file system refused bytes (full, quota, too large, read-only)."""
    return isinstance(error, OSError) and error.errno in REFUSED_WRITES


class LogFileHandler(logging.FileHandler):
    """logging's FileHandler (a run's train.log), whose refused write is the one-line full-disk message.

    logging would print a "--- Logging error ---" traceback for each line and go
    on; instead the first refused line stops the run with WriteFailed, raised
    where the line was logged (in the main thread; another thread's line is
    dropped and the main thread's next one raises). After it, the file is left
    alone, so the lines that report the stop still reach the console.
    """

    failed: OSError | None = None  # the refused write, once one was
    reported = False  # whether the main thread has raised it

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed is None:
            super().emit(record)
        elif threading.current_thread() is threading.main_thread() and not self.reported:
            self.reported = True
            raise write_failed(Path(self.baseFilename), self.failed, appending=True)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if not is_refused_write(error):
            super().handleError(record)
            return
        self.failed = error
        stream, self.stream = self.stream, None  # what it still buffers cannot be written either
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        self.emit(record)


def format_bytes(size: int) -> str:
    """A byte count as people read it: 512 B, 3.4 MB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"  # not reached


# Folders made for a file, and removed again when nothing came of them -------------------------------------


def folders_to_make(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, path first (deepest first)."""
    path = Path(path).absolute()
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Remove each folder, deepest first, while it is empty: what a refusal made for nothing goes again."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def removed_unless_filled(folder: Path) -> Iterator[None]:
    """Make folder (and its parents); if the block fails, remove those it made that are left empty."""
    made = folders_to_make(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        remove_if_empty(made)
        raise


# What our commands wrote into a folder, so that they replace only their own --------------------------------


def written_record(folder: Path) -> dict:
    """The folder's WRITTEN_FILE: {"files": {name: {"size", "mtime_ns"}}, "by": command}, or an empty one."""
    try:
        record = json.loads((Path(folder) / WRITTEN_FILE).read_text())
    except (OSError, ValueError):
        return {"files": {}}
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else {"files": {}}


def stamp_of(path: Path) -> dict:
    """What identifies a file as it was left: its size and modification time (cheap; an edit changes them)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def not_ours(folder: Path, names: Iterable[str]) -> list[str]:
    """Those of names that exist in folder and are not files our commands wrote there, unchanged since."""
    files = written_record(folder)["files"]
    foreign = []
    for name in sorted(set(names) - {WRITTEN_FILE}):
        path = Path(folder) / name
        if not os.path.lexists(path):
            continue
        try:
            ours = path.is_file() and not path.is_symlink() and files.get(name) == stamp_of(path)
        except OSError:
            ours = False
        if not ours:
            foreign.append(name)
    return foreign


def record_written(folder: Path, paths: Iterable[Path], command: str) -> None:
    """Add paths (files in folder) to the folder's record of what our commands wrote there."""
    record = written_record(folder)
    record["files"].update({Path(p).name: stamp_of(Path(p)) for p in paths})
    record["by"] = command
    write_atomically(Path(folder) / WRITTEN_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def describe_names(names: list[str]) -> str:
    """'a, b, c' or 'a, b, c, d, e and 3 more': what a refusal says is in the way."""
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def check_own_files(folder: Path, names: Iterable[str], command: str, what_to_do: str) -> None:
    """Refuse, in one line, to write names into folder where one is a file our commands did not write."""
    foreign = not_ours(folder, names)
    if foreign:
        raise UserError(f"{folder} already holds {describe_names(foreign)}, which {command} did not write "
                        f"and will not replace; {what_to_do} (nothing was written)")


# A directory written whole: staged beside it, then moved into place -----------------------------------------


def check_new_directory(out: Path, command: str, key: str) -> None:
    """Refuse an out directory a command may not write as a whole: one line naming it and what is in it.

    It may be new, empty, or one that command wrote before (every entry in it its
    own, unchanged). The directory the user stands in (or one holding it) is
    never replaced.
    """
    out = Path(out).expanduser()
    where = out.absolute()
    if Path.cwd() == where.resolve() or where.resolve() in Path.cwd().parents:
        raise UserError(f"{key}={out} is the directory you are in (or holds it); {command} writes a "
                        f"directory of its own: give a new one, e.g. {key}=exported/NAME")
    if os.path.lexists(where) and not where.is_dir():
        raise UserError(f"{key}={out} is a file; give a new directory for {command} to write")
    if not where.is_dir():
        return
    entries = os.listdir(where)
    if WRITTEN_FILE not in entries or written_record(where).get("by") != command:
        foreign = sorted(entries)
    else:
        foreign = not_ours(where, entries)
    if foreign:
        raise UserError(f"{key}={out} already holds {describe_names(foreign)}, which {command} did not "
                        "write; it writes into a new or empty directory, or over an earlier one of its own: "
                        f"give another {key}= (nothing was written)")


def write_directory(out: Path, fill: Callable[[Path], None], command: str, key: str) -> Path:
    """Write the directory out whole: fill(staging) fills a new folder beside it, which then takes its place.

    out is checked first (check_new_directory). Until the move, out is as it was:
    a failed or interrupted fill leaves it whole and removes the staging folder
    (a kill -9 leaves that hidden folder beside it, and out still whole). The
    files written are recorded in out, so the next run of command may replace them.
    """
    out = Path(out).expanduser().absolute()
    check_new_directory(out, command, key)
    with removed_unless_filled(out.parent):
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
        try:
            fill(staging)
            for path in (staging, *staging.rglob("*")):  # what fill wrote through temporary files too
                if not path.is_symlink():
                    permit_as_open_would(path)
            record_written(staging, [p for p in staging.iterdir() if p.is_file()], command)
            check_new_directory(out, command, key)  # again: nothing may have come in meanwhile
            move_into_place(staging, out)
        except OSError as error:
            if error.errno in REFUSED_WRITES:
                shutil.rmtree(staging, ignore_errors=True)  # first, so its space counts as free
                raise write_failed(out, error) from None
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def move_into_place(staging: Path, out: Path) -> None:
    """Rename staging to out; an earlier out (ours) is renamed aside first and removed once replaced.

    The two renames run with Ctrl-C and SIGTERM held back, so a stop cannot fall
    between them; a kill -9 there (microseconds) would leave the earlier
    directory whole under its hidden name beside out.
    """
    if not out.is_dir() or not any(out.iterdir()):
        os.rename(staging, out)  # POSIX renames a folder over an empty one in one step
        return
    aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    held = hasattr(signal, "pthread_sigmask")
    if held:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        os.rename(out, aside)
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(aside, out)
            raise
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    shutil.rmtree(aside, ignore_errors=True)
