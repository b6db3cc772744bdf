"""What every stage shares at run time: thread counts, progress bars and log lines.

Thread counts are scoped: FAISS's OpenMP count is per calling thread, so `faiss_threads`
sets it for the block and restores it, and concurrent callers in other threads are not
disturbed. Nothing here changes process-wide state.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Protocol

from mnist_ann.errors import InvalidArgument

Log = Callable[[str], None]


def silent(message: str) -> None:
    """A log that drops every message."""


class ProgressBar(Protocol):
    """What the library needs of a progress bar (click's fits): a context with update(n)."""

    def __enter__(self) -> ProgressBar: ...

    def __exit__(self, *exc: object) -> None: ...

    def update(self, n_steps: int) -> None: ...


Progress = Callable[[str, int], ProgressBar]


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n_steps: int) -> None:
        return None


def no_progress(label: str, length: int) -> ProgressBar:
    return _NoProgress()


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity), not every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> int:
    """`threads`, or the default when None; at least 1."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidArgument(f"threads must be a whole number of at least 1, not {threads!r}")
    return threads


@contextlib.contextmanager
def faiss_threads(threads: int | None) -> Iterator[int]:
    """Run the block with FAISS (OpenMP, and the BLAS FAISS calls) on `threads` threads.

    OpenMP keeps its thread count per calling thread: this sets the caller's and restores
    it on leaving, so the process is left as it was found.
    """
    import faiss

    threads = check_threads(threads)
    saved = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield threads
    finally:
        faiss.omp_set_num_threads(saved)
