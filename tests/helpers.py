"""Helpers for the tests: synthetic data writers and a CLI runner."""

from __future__ import annotations

import gzip
import itertools
import os
import pickle
import resource
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result

from mnist_ann.cli import main


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Encode a uint8 array as an IDX file (images [n, 28, 28] or labels [n])."""
    header = struct.pack(">II", magic, array.shape[0])
    if array.ndim == 3:
        header += struct.pack(">II", *array.shape[1:])
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_dir(folder: Path, images: np.ndarray, labels: np.ndarray, n_train: int,
                  compress: bool = False) -> Path:
    """Write the four MNIST IDX files for images [n, 784] and labels [n]."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train-images-idx3-ubyte": (images[:n_train].reshape(-1, 28, 28), 2051),
        "train-labels-idx1-ubyte": (labels[:n_train], 2049),
        "t10k-images-idx3-ubyte": (images[n_train:].reshape(-1, 28, 28), 2051),
        "t10k-labels-idx1-ubyte": (labels[n_train:], 2049),
    }
    for name, (array, magic) in parts.items():
        data = idx_bytes(array, magic)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (folder / name).write_bytes(data)
    return folder


def mirror_pickle(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The mirror's layout: three (float32 pixels / 256, int64 labels) pairs."""
    cuts = [0, len(images) // 2, 3 * len(images) // 4, len(images)]
    parts = tuple((images[a:b].astype(np.float32) / 256, labels[a:b].astype(np.int64))
                  for a, b in itertools.pairwise(cuts))
    return pickle.dumps(parts, protocol=4)  # the mirror is Python 2 protocol 2; same objects


def fake_wheel(path: Path, member: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/data/mnist.pkl.gz", gzip.compress(member))
    return path


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def assert_clean_error(result: Result, exit_code: int, fragment: str) -> str:
    """One `Error:` line naming the problem, the given exit code, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.output, result.stderr)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.stderr
    assert fragment.lower() in error_lines[0].lower(), error_lines[0]
    assert "Traceback" not in result.output + result.stderr
    return error_lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its content, to prove nothing was written."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def clustered_digits(n: int, seed: int = 0, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 'digits' [n, 784] with labels: class centres plus low-dimensional noise.

    Their intrinsic dimension is low, like MNIST's, so approximate search can reach high recall.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n).astype(np.uint8)
    centres = rng.uniform(40, 215, (n_classes, 784))
    basis = rng.normal(0, 1, (12, 784))
    latent = rng.normal(0, 6, (n, 12))
    pixels = centres[labels] + latent @ basis
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels


def exact_knn(train: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force squared L2, exact, ordered by (distance, training row).

    Computed in float64 BLAS: for pixels every product and partial sum is an integer far
    below 2⁵³, so the result is exact, then kept as int64.
    """
    t = train.astype(np.float64)
    q = queries.astype(np.float64)
    distances = np.rint((q * q).sum(1)[:, None] + (t * t).sum(1)[None, :]
                        - 2 * q @ t.T).astype(np.int64)
    order = np.lexsort((np.broadcast_to(np.arange(len(t)), distances.shape), distances), axis=1)
    order = order[:, :k]
    return np.take_along_axis(distances, order, 1), order


def make_collection(store: Path, name: str, images: np.ndarray, labels: np.ndarray,
                    test_size: float = 0.1):
    """A collection over synthetic data, split like the seed split."""
    from mnist_ann.api import Collection
    from mnist_ann.data.mnist import Dataset, Split
    from mnist_ann.store.manage import create_collection

    create_collection(store, name, Dataset(images, labels, "synthetic"),
                      Split.make("seed", test_size, 0), lambda message: None)
    return Collection.open(store, name)


def pair_distances(train: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact squared L2 between each query and its listed training rows (inf for id -1)."""
    diffs = train[np.maximum(ids, 0)].astype(np.int64) - queries[:, None, :].astype(np.int64)
    distances = (diffs * diffs).sum(-1).astype(np.float64)
    distances[ids < 0] = np.inf
    return distances


# runs the CLI, then prints the process's peak resident memory on stderr, whatever the exit
# (VmHWM, this process's own: getrusage's ru_maxrss survives exec and can be the parent's)
MEASURED = ("import re, runpy, sys\n"
            "sys.argv[0] = 'mnist-ann'\n"
            "try:\n    runpy.run_module('mnist_ann', run_name='__main__')\n"
            "finally:\n    status = open('/proc/self/status').read()\n"
            "    print('peak-rss-kb', re.search(r'VmHWM:\\s+(\\d+)', status)[1], "
            "file=sys.stderr)")


def cli(store: Path, *args: str, env: dict | None = None, limit: int | None = None,
        measure: bool = False, **popen) -> subprocess.Popen:
    """The real command in a process of its own (optionally under a file-size limit, or
    reporting its peak memory as `peak-rss-kb N` on stderr)."""
    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    start = ["-c", MEASURED] if measure else ["-m", "mnist_ann"]
    return subprocess.Popen([sys.executable, *start, *map(str, args), "--store", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
                                 **(env or {})},
                            preexec_fn=file_size_limit if limit else None, **popen)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]
