"""Run ``python -m nanogpt.data`` saying on stderr when it starts to wait for a cache folder's lock.

Usage: ``python -m tests.lock_waits [data overrides]``. A test that needs a process to be
waiting on the lock waits for the line ``waiting for LOCK_FILE`` instead of sleeping long
enough for the process to get there. The lock itself is the product's: only its acquiring is
watched, here in the test process's copy, as tests/faults.py watches training.
"""

from __future__ import annotations

import sys

from filelock import FileLock, Timeout

from nanogpt import data
from nanogpt.dataset import pipeline


class AnnouncedLock(FileLock):
    """A FileLock that says so when it cannot be taken at once, then waits as usual."""

    def acquire(self, *args, **kwargs):
        if args or kwargs:
            return super().acquire(*args, **kwargs)
        try:
            return super().acquire(blocking=False)
        except Timeout:
            print(f"waiting for {self.lock_file}", file=sys.stderr, flush=True)
            return super().acquire()


if __name__ == "__main__":
    pipeline.FileLock = AnnouncedLock
    data.main()
