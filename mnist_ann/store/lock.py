"""The write lock of a collection: an exclusive `flock` on its `.lock` file.

Every write of a collection (build, tune, the report's ground-truth cache, drop, upgrade)
holds it while it re-reads the manifest, writes its files and saves the manifest, so two
commands writing one collection at once apply both their changes, one after the other.
Readers take no lock: files are written under temporary names and renamed into place, the
manifest last, so a reader sees the state before a change or after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from mnist_ann.fileio import checkpoint
from mnist_ann.runtime import Log, silent

LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(folder: Path, log: Log = silent) -> Iterator[None]:
    """Hold the exclusive write lock of `folder` for the block (waiting for it if need be).

    flock locks belong to the open file, so they exclude other threads of this process as
    well as other processes, and the kernel releases them when a process dies.
    """
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another command writing {folder}")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        checkpoint("locked")
        yield
    finally:
        os.close(descriptor)  # closing the only descriptor of the open file releases the lock
