"""A collection folder: Parquet tables, the manifest, checksums and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnist_ann.errors import DataError, IntegrityError, InvalidArgument, MnistAnnError
from mnist_ann.fileio import (
    atomic_path,
    remove_stale_temporaries,
    sha256_file,
    write_json,
)
from mnist_ann.mnist import FINGERPRINT, N_PIXELS, Dataset, Split, load_mnist

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TRAIN_FILE = "train.parquet"
TEST_FILE = "test.parquet"
STORE_ENV = "MNIST_ANN_STORE"
DEFAULT_STORE = Path("indexes")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

TABLE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("label", pa.uint8()),
    ("pixels", pa.list_(pa.uint8(), N_PIXELS)),
])

Log = Callable[[str], None]


def resolve_store(store: str | Path | None = None) -> Path:
    """The store folder: the given one, else $MNIST_ANN_STORE, else ./indexes."""
    if store:
        return Path(store)
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


def validate_name(name: str, what: str = "collection") -> str:
    if not _NAME_PATTERN.match(name):
        raise InvalidArgument(f"{what} name {name!r} must be letters, digits, '.', '_' or '-' "
                              "(up to 64, not starting with a punctuation mark)")
    return name


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".write-probe") as probe:
            probe.write_bytes(b"")
        (folder / ".write-probe").unlink()
    except OSError as exc:
        raise MnistAnnError(f"store {folder} is not writable ({exc.strerror or exc}); choose "
                            f"another with --store or {STORE_ENV}") from exc


@dataclass(frozen=True)
class Table:
    """Rows of MNIST: ids (rows of MNIST-70k), labels (or None) and uint8 pixels [n, 784]."""

    ids: np.ndarray
    labels: np.ndarray | None
    pixels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def table_to_arrow(table: Table) -> pa.Table:
    pixels = np.ascontiguousarray(table.pixels, dtype=np.uint8).reshape(-1)
    labels = None if table.labels is None else pa.array(table.labels, pa.uint8())
    if labels is None:
        labels = pa.nulls(len(table), pa.uint8())
    return pa.Table.from_arrays(
        [pa.array(table.ids, pa.int64()), labels,
         pa.FixedSizeListArray.from_arrays(pa.array(pixels, pa.uint8()), N_PIXELS)],
        schema=TABLE_SCHEMA)


def write_table(path: Path, table: Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table_to_arrow(table), tmp)


def arrow_to_table(arrow: pa.Table, what: str) -> Table:
    """A Table from Arrow data with the collection schema (labels may be absent or null)."""
    names = set(arrow.column_names)
    if "pixels" not in names:
        raise DataError(f"{what} has no 'pixels' column; expected columns id, label, pixels")
    pixels_type = arrow.schema.field("pixels").type
    if not (pa.types.is_fixed_size_list(pixels_type) or pa.types.is_list(pixels_type)) or \
            not pa.types.is_integer(pixels_type.value_type):
        raise DataError(f"{what}: 'pixels' is {pixels_type}, expected "
                        f"fixed_size_list<uint8>[{N_PIXELS}]")
    column = arrow.column("pixels").combine_chunks()
    if column.null_count:
        raise DataError(f"{what}: 'pixels' has empty rows")
    if pa.types.is_list(pixels_type):
        widths = set(np.diff(column.offsets.to_numpy()).tolist())
        if widths - {N_PIXELS}:
            wrong = (widths - {N_PIXELS}).pop()
            raise DataError(f"{what}: rows have {wrong} pixels, expected {N_PIXELS}")
    elif pixels_type.list_size != N_PIXELS:
        raise DataError(f"{what}: rows have {pixels_type.list_size} pixels, expected {N_PIXELS}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise DataError(f"{what}: pixel values outside 0..255")
    pixels = values.astype(np.uint8, copy=False).reshape(-1, N_PIXELS)
    ids = (arrow.column("id").to_numpy().astype(np.int64) if "id" in names
           else np.arange(len(pixels), dtype=np.int64))
    labels = None
    if "label" in names and arrow.column("label").null_count < len(arrow):
        if arrow.column("label").null_count:
            raise DataError(f"{what}: some rows have labels and some do not")
        labels = arrow.column("label").to_numpy().astype(np.uint8)
    return Table(ids, labels, pixels)


def read_table(path: Path) -> Table:
    try:
        arrow = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    return arrow_to_table(arrow, str(path))


class Collection:
    """One split of MNIST stored as Parquet tables, index files and a manifest."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self._tables: dict[str, Table] = {}

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def split(self) -> Split:
        return Split.from_dict(self.manifest["split"])

    @property
    def indexes(self) -> dict[str, dict]:
        return self.manifest.setdefault("indexes", {})

    @classmethod
    def open(cls, store: Path, name: str) -> Collection:
        root = store / validate_name(name)
        path = root / MANIFEST
        if not path.is_file():
            known = ", ".join(c.name for c in list_collections(store)) or "none yet"
            raise MnistAnnError(f"no collection {name!r} in store {store} (known: {known}); "
                                "create it with `mnist-ann build`")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable manifest ({exc})") from exc
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"{path}: schema version {manifest.get('schema_version')}, this "
                            f"mnist-ann reads {SCHEMA_VERSION}; rebuild the collection")
        return cls(root, manifest)

    def verified(self, filename: str) -> Path:
        """The path of a recorded file after checking its sha256 against the manifest."""
        record = self.manifest["files"].get(filename)
        path = self.root / filename
        if record is None:
            raise IntegrityError(f"{path} is not recorded in the manifest")
        if not path.is_file():
            raise IntegrityError(f"{path} is missing; rebuild with `mnist-ann build --force`")
        if sha256_file(path) != record["sha256"]:
            raise IntegrityError(f"{path} fails its checksum (changed since it was built); "
                                 "rebuild with `mnist-ann build --force`")
        return path

    def table(self, filename: str) -> Table:
        if filename not in self._tables:
            self._tables[filename] = read_table(self.verified(filename))
        return self._tables[filename]

    def train(self) -> Table:
        return self.table(TRAIN_FILE)

    def test(self) -> Table:
        return self.table(TEST_FILE)

    def record_file(self, filename: str) -> dict:
        record = file_record(self.root / filename)
        self.manifest["files"][filename] = record
        return record

    def save(self) -> None:
        """Write the manifest (atomically; callers write every other file first)."""
        write_json(self.root / MANIFEST, self.manifest)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.root),
            "split": self.manifest["split"],
            "source": self.manifest["dataset"]["source"],
            "rows": self.manifest["rows"],
            "files": self.manifest["files"],
            "indexes": self.indexes,
        }


def list_collections(store: Path) -> list[Collection]:
    if not store.is_dir():
        return []
    found = []
    for child in sorted(store.iterdir()):
        if (child / MANIFEST).is_file():
            with contextlib.suppress(MnistAnnError):
                found.append(Collection.open(store, child.name))
    return found


def create_collection(store: Path, name: str, dataset: Dataset, split: Split,
                      log: Log) -> Collection:
    """Write the split's train and test tables and a fresh manifest into store/name."""
    validate_name(name)
    ensure_writable(store)
    root = store / name
    if (root / MANIFEST).exists():
        raise MnistAnnError(f"collection {name!r} already exists in {store}")
    fresh_folder = not root.exists()
    try:
        root.mkdir(exist_ok=True)
        remove_stale_temporaries(root)
        train_ids, test_ids = split.ids(len(dataset.labels))
        started = time.perf_counter()
        files = {}
        for filename, ids in ((TRAIN_FILE, train_ids), (TEST_FILE, test_ids)):
            log(f"writing {root / filename} ({len(ids):,} rows)")
            write_table(root / filename, Table(ids, dataset.labels[ids], dataset.images[ids]))
            files[filename] = file_record(root / filename)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "dataset": {"name": "mnist-70k", "fingerprint": FINGERPRINT,
                        "source": dataset.source},
            "split": split.to_dict(),
            "rows": {"train": len(train_ids), "test": len(test_ids)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
            "indexes": {},
        }
        write_json(root / MANIFEST, manifest)
    except OSError as exc:
        if fresh_folder:
            shutil.rmtree(root, ignore_errors=True)
        raise MnistAnnError(f"cannot write collection {root} ({exc.strerror or exc})") from exc
    log(f"collection {name!r} written in {time.perf_counter() - started:.1f} s")
    return Collection(root, manifest)


def ensure_collection(store: Path, name: str, split: Split, source: str, log: Log,
                      must_match: bool = True) -> Collection:
    """Open collection `name`, or create it from MNIST with `split` if it does not exist.

    With `must_match`, an existing collection must hold `split`.
    """
    validate_name(name)
    ensure_writable(store)
    if (store / name / MANIFEST).is_file():
        collection = Collection.open(store, name)
        if must_match and collection.split != split:
            raise MnistAnnError(f"collection {name!r} holds split {collection.split.to_dict()}, "
                                f"not {split.to_dict()}; choose another --collection")
        log(f"collection {name!r} exists with split {collection.split.to_dict()}; kept")
        return collection
    return create_collection(store, name, load_mnist(source, log=log), split, log)
