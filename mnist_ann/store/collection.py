"""A collection folder: Parquet tables, index files, build records and the manifest.

The store only loads and verifies: every file is checked against the manifest's sha256 before
anything parses it, and an index is checked against its build record too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_ann.data.mnist import FINGERPRINT, Dataset, Split, load_mnist
from mnist_ann.data.tables import Table, arrow_to_table, read_arrow, write_parquet
from mnist_ann.errors import DataError, IntegrityError, InvalidArgument, MnistAnnError
from mnist_ann.fileio import (
    atomic_path,
    remove_stale_temporaries,
    sha256_file,
    sha256_handle,
    write_json,
)
from mnist_ann.runtime import Log

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
TRAIN_FILE = "train.parquet"
TEST_FILE = "test.parquet"
STORE_ENV = "MNIST_ANN_STORE"
DEFAULT_STORE = Path("indexes")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# what identifies a built index; the build record beside the index file repeats these
SPEC_FIELDS = ("recipe", "factory", "build_args", "pipeline", "rank_space", "certified")
RECORD_SUFFIX = ".build.json"
READ_BLOCK = 1 << 22


def resolve_store(store: str | Path | None = None) -> Path:
    """The store folder: the given one, else $MNIST_ANN_STORE, else ./indexes."""
    if store:
        return Path(store)
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


def validate_name(name: str, what: str = "collection") -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
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


def write_table(path: Path, table: Table) -> None:
    with atomic_path(path) as tmp:
        write_parquet(table, tmp)


@dataclass(frozen=True)
class StoredIndex:
    """A FAISS index read from a collection, verified against its manifest entry and build
    record."""

    name: str
    entry: dict
    index: object  # faiss.Index

    @property
    def space_key(self) -> str:
        """A file-name-safe key of the space the index ranks in: `pixels`, `deskew`, or, when
        its own fitted transforms take part, the pipeline with the index file's checksum."""
        key = "-".join(self.entry.get("pipeline") or []) or "pixels"
        if self.entry.get("rank_space") == "index":
            return f"{key}-{self.entry['sha256'][:12]}"
        return key


class Collection:
    """One split of MNIST stored as Parquet tables, index files and a manifest."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self._tables: dict[str, Table] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def split(self) -> Split:
        return Split.from_dict(self.manifest["split"])

    @property
    def indexes(self) -> dict[str, dict]:
        return self.manifest.setdefault("indexes", {})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, rows={self.manifest['rows']}, "
                f"indexes={list(self.indexes)})")

    @classmethod
    def open(cls, store: Path, name: str) -> Collection:
        root = Path(store) / validate_name(name)
        path = root / MANIFEST
        if not path.is_file():
            known = ", ".join(c.name for c in list_collections(Path(store))) or "none yet"
            raise MnistAnnError(f"no collection {name!r} in store {store} (known: {known}); "
                                "create it with `mnist-ann build`")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable manifest ({exc})") from exc
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version == 1:
            raise DataError(f"{path}: collection {name!r} has the older schema 1 (pixels as "
                            f"lists, slow to read); upgrade it in place with `mnist-ann "
                            f"upgrade {name}`")
        if version != SCHEMA_VERSION:
            raise DataError(f"{path}: schema version {version!r}, this mnist-ann reads "
                            f"{SCHEMA_VERSION}; rebuild the collection")
        return cls(root, manifest)

    # --- verified reading ----------------------------------------------------------------

    def _record(self, filename: str) -> dict:
        record = self.manifest["files"].get(filename)
        if record is None:
            raise IntegrityError(f"{self.root / filename} is not recorded in the manifest")
        return record

    def _damaged(self, path: Path, problem: str) -> IntegrityError:
        return IntegrityError(f"{path} {problem}; {self.remedy(path.name)}")

    def remedy(self, filename: str) -> str:
        """What to do about a damaged or missing file."""
        for name, entry in self.indexes.items():
            if filename in (entry.get("file"), entry.get("record")):
                return (f"rebuild the index with `mnist-ann build --collection {self.name} "
                        f"--index {entry.get('recipe', name)} --force`")
        return (f"rebuild the collection: `mnist-ann drop {self.name}`, then `mnist-ann build "
                f"--collection {self.name}` with its split options")

    def read_verified(self, filename: str) -> bytes:
        """A recorded file's bytes, after checking their sha256 against the manifest."""
        record = self._record(filename)
        path = self.root / filename
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self._damaged(path, "is missing") from None
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise self._damaged(path, "fails its checksum (changed since it was written)")
        return data

    def verified(self, filename: str) -> Path:
        """The path of a recorded file after checking its sha256 against the manifest."""
        self.read_verified(filename)
        return self.root / filename

    def table(self, filename: str) -> Table:
        """A recorded table, verified and parsed once (later calls share it)."""
        with self._lock:
            if filename not in self._tables:
                what = str(self.root / filename)
                arrow = read_arrow(self.read_verified(filename), what)
                self._tables[filename] = arrow_to_table(arrow, what)
            return self._tables[filename]

    def train(self) -> Table:
        return self.table(TRAIN_FILE)

    def test(self) -> Table:
        return self.table(TEST_FILE)

    def load_index(self, name: str) -> StoredIndex:
        """Index `name`, read only after its file passes the manifest's sha256 and its build
        record agrees with the manifest entry."""
        entry = self.indexes.get(name)
        if entry is None:
            known = ", ".join(self.indexes) or "none built yet"
            raise MnistAnnError(f"collection {self.name!r} has no index {name!r} (built: "
                                f"{known}); build it with `mnist-ann build --index`")
        check_build_record(self, name, entry)
        recorded = self.manifest["files"].get(entry["file"], {}).get("sha256")
        if recorded != entry.get("sha256"):
            raise self._damaged(self.root / entry["file"],
                                "is not the file the manifest's index entry names")
        return StoredIndex(name, entry, self._read_index(self.root / entry["file"],
                                                          entry["sha256"]))

    def _read_index(self, path: Path, sha256: str) -> object:
        """Hash the open file, then let FAISS read it through the same open file.

        A file swapped in by rename after the check cannot reach FAISS (the descriptor keeps
        the checked file), and one overwritten in place during the read is caught by its
        changed modification times. Only one copy of the index is ever in memory.
        """
        import faiss

        try:
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise self._damaged(path, "is missing") from None
        with handle:
            before = os.fstat(handle.fileno())
            if sha256_handle(handle) != sha256:
                raise self._damaged(path, "fails its checksum (changed since it was built)")
            handle.seek(0)
            same_file = Path(f"/proc/self/fd/{handle.fileno()}")
            try:
                if same_file.exists():  # FAISS's own buffered reader, on the checked file
                    index = faiss.read_index(str(same_file))
                else:
                    reader = faiss.PyCallbackIOReader(handle.read, READ_BLOCK)
                    index = faiss.read_index(reader)
                    del reader
            except RuntimeError as exc:  # not expected after the checksum: a FAISS mismatch
                raise self._damaged(path, f"cannot be read by this FAISS ({exc})") from exc
            after = os.fstat(handle.fileno())
        if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
                after.st_size, after.st_mtime_ns, after.st_ctime_ns):
            raise self._damaged(path, "was changed while it was being read")
        return index

    # --- writing -------------------------------------------------------------------------

    def record_file(self, filename: str, record: dict | None = None) -> dict:
        record = record or file_record(self.root / filename)
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


def check_build_record(collection: Collection, name: str, entry: dict) -> None:
    """Refuse an index whose manifest entry no longer says how it was built.

    The build record is written beside the index, checksummed in the manifest, and names the
    index file's sha256: an edited pipeline, factory or ranking space is caught here.
    """
    rebuild = f"rebuild it with `mnist-ann build --collection {collection.name} --index " \
              f"{entry.get('recipe', name)} --force`"
    if "record" not in entry or "file" not in entry:
        raise IntegrityError(f"index {name!r} has no build record in the manifest (built by an "
                             f"older mnist-ann, or the manifest was edited); {rebuild}")
    try:
        record = json.loads(collection.read_verified(entry["record"]))
    except ValueError as exc:
        raise IntegrityError(f"index {name!r}: its build record is not JSON; {rebuild}") from exc
    if not isinstance(record, dict) or record.get("index_sha256") != entry.get("sha256"):
        raise IntegrityError(f"index {name!r}: its build record belongs to another index file; "
                             f"{rebuild}")
    for field_name in SPEC_FIELDS:
        if record.get(field_name) != entry.get(field_name):
            raise IntegrityError(
                f"index {name!r}: the manifest says {field_name} {entry.get(field_name)!r} but "
                f"the index was built with {record.get(field_name)!r} (the manifest was edited "
                f"after the build); restore the manifest or {rebuild}")


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


def upgrade_collection(store: Path, name: str, log: Log) -> bool:
    """Rewrite a schema-1 collection's tables in schema 2, keeping its indexes.

    The rows are read from the old tables (checked against the old manifest), written anew,
    read back and compared; only then is the manifest replaced. Returns False when the
    collection already has the current schema.
    """
    root = Path(store) / validate_name(name)
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise MnistAnnError(f"no collection {name!r} in store {store}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("schema_version") == SCHEMA_VERSION:
        return False
    if manifest.get("schema_version") != 1:
        raise DataError(f"{path}: schema version {manifest.get('schema_version')!r} cannot be "
                        "upgraded; rebuild the collection")
    old = Collection(root, manifest)
    ensure_writable(root)
    renamed = {}
    for filename in (TRAIN_FILE, TEST_FILE):
        what = str(root / filename)
        rows = arrow_to_table(read_arrow(old.read_verified(filename), what), what)
        write_table(root / filename, rows)
        again = arrow_to_table(read_arrow(root / filename, what), what)
        same_labels = (rows.labels is None and again.labels is None) or (
            rows.labels is not None and again.labels is not None
            and np.array_equal(rows.labels, again.labels))
        if not (same_labels and np.array_equal(rows.ids, again.ids)
                and np.array_equal(rows.pixels, again.pixels)):
            raise IntegrityError(f"{root / filename}: the upgraded table differs from the old "
                                 "one; rebuild the collection")
        renamed[manifest["files"][filename]["sha256"]] = old.record_file(filename)["sha256"]
        log(f"{filename}: rewritten with pixels as fixed_size_binary(784)")
    for entry in manifest.get("indexes", {}).values():
        entry["train_sha256"] = renamed.get(entry.get("train_sha256"), entry.get("train_sha256"))
    manifest["schema_version"] = SCHEMA_VERSION
    write_json(path, manifest)
    return True
