"""Atomic writes and checksums, shared by every module that writes files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARKER = ".tmp-"


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` that `remove_stale_temporaries` recognises."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporaries left by a process that was killed mid-write."""
    for stale in folder.glob(f".*{TMP_MARKER}*"):
        stale.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_named_by_content(folder: Path, stem: str, suffix: str,
                           write: Callable[[Path], None]) -> tuple[str, str]:
    """Write a file through `write(tmp)` and rename it to STEM-<sha256[:12]>SUFFIX.

    A file named by its content never replaces the one a manifest still points to.
    Returns the file name and the full sha256.
    """
    tmp = temporary_name(folder / f"{stem}{suffix}")
    try:
        write(tmp)
        digest = sha256_file(tmp)
        name = f"{stem}-{digest[:12]}{suffix}"
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return name, digest
