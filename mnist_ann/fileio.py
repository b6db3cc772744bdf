"""Durable atomic writes and checksums, shared by every module that writes files.

A file is written under a temporary name beside its target (the writer's pid and a random
part), flushed and fsynced, its size checked, renamed into place with `os.replace`, and the
folder fsynced: after a crash or a full disk the target is either the old file or the whole
new one, never a part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_MARKER = ".tmp-"
KILL_ENV = "MNIST_ANN_KILL_AT"
_checkpoints = 0


def checkpoint(name: str) -> None:
    """A test hook: with $MNIST_ANN_KILL_AT set to N (or to `name`), the process kills
    itself with SIGKILL at the N-th checkpoint it reaches (or at the one called `name`)."""
    global _checkpoints
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    _checkpoints += 1
    if wanted in (name, str(_checkpoints)):
        os.kill(os.getpid(), signal.SIGKILL)


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, carrying this process's pid and a random part."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; if the block succeeds, make the file durable and
    rename it into place. On failure the temporary is removed and `path` is untouched."""
    tmp = temporary_name(path)
    try:
        yield tmp
        checkpoint(f"written:{path.name}")
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_folder(path.parent)
        checkpoint(f"renamed:{path.name}")
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` durably and atomically, checking the size that reached disk."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
        if tmp.stat().st_size != len(data):
            raise OSError(f"{path}: wrote {tmp.stat().st_size} of {len(data)} bytes")


def write_json(path: Path, data: dict) -> None:
    write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def write_named_by_content(folder: Path, stem: str, suffix: str,
                           data: bytes | memoryview) -> tuple[str, str]:
    """Write `data` as STEM-<sha256[:12]>SUFFIX in `folder`; return the name and sha256.

    A file named by its content never replaces the one a manifest still points to, and its
    checksum is computed once, from the bytes written.
    """
    digest = hashlib.sha256(data).hexdigest()
    name = f"{stem}-{digest[:12]}{suffix}"
    write_bytes(folder / name, data)
    return name, digest


def _writer_alive(name: str) -> bool:
    """Whether the process whose pid a temporary name carries still runs."""
    try:
        pid = int(name.split(TMP_MARKER, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporaries left by writers that are gone (killed mid-write); those of live
    writers are theirs to finish."""
    for stale in folder.glob(f".*{TMP_MARKER}*"):
        if not _writer_alive(stale.name):
            stale.unlink(missing_ok=True)


def sha256_handle(handle: BinaryIO) -> str:
    """sha256 of what is left to read in an open binary file."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 22), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return sha256_handle(handle)
