"""A collection folder: Parquet tables, index files, build records and the manifest.

The store only loads and verifies: every file is checked against the manifest's sha256 before
anything parses it, and an index is checked against its build record too. Writes go through
`Collection.writing()`, under the collection's lock (lock.py), on the manifest as it is on
disk at that moment.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mnist_ann.data.mnist import N_PIXELS, Split
from mnist_ann.data.tables import (
    PartsFile,
    Table,
    arrow_to_table,
    byte_spans,
    read_arrow,
    read_rows,
    write_parquet,
)
from mnist_ann.errors import DataError, IntegrityError, InvalidArgument, MnistAnnError
from mnist_ann.fileio import (
    atomic_path,
    checkpoint,
    sha256_file,
    sha256_handle,
    temporary_name,
    write_json,
)
from mnist_ann.runtime import Log, silent
from mnist_ann.store.lock import locked

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
TRAIN_FILE = "train.parquet"
TEST_FILE = "test.parquet"
STORE_ENV = "MNIST_ANN_STORE"
DEFAULT_STORE = Path("indexes")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# what identifies a built index; the build record beside the index file repeats these
SPEC_FIELDS = ("recipe", "factory", "build_args", "pipeline", "rank_space", "certified",
               "shards")
RECORD_SUFFIX = ".build.json"
SHARD_LIST_SUFFIX = ".shards.json"
MANIFEST_LIMIT = 16 << 20  # bytes: a manifest is a few kilobytes


def resolve_store(store: str | Path | None = None) -> Path:
    """The store folder: the given one, else $MNIST_ANN_STORE, else ./indexes."""
    if store:
        return Path(store)
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


def store_flag(store: Path) -> str:
    """` --store PATH` when `store` is not the one commands use by default, for remedies."""
    if store.resolve() == resolve_store().resolve():
        return ""
    return f" --store {shlex.quote(str(store))}"


def index_option(name: str, entry: dict) -> str:
    """The `--index` option that builds this manifest entry again."""
    return (f"--index {entry.get('recipe', name)}" if entry.get("builtin", True)
            else f"--index {name}={entry.get('factory')}")


def validate_name(name: str, what: str = "collection") -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise InvalidArgument(f"{what} name {name!r} must be letters, digits, '.', '_' or '-' "
                              "(up to 64, not starting with a punctuation mark)")
    return name


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def table_record(path: Path) -> dict:
    """A table's record: the file's sha256 and size, and each part's (row group's) bytes,
    rows and sha256, with the footer's, so that a reader of some rows checks only theirs."""
    groups, tail = byte_spans(path)
    record = file_record(path)
    with open(path, "rb") as handle:
        def part(span, rows: bool) -> dict:
            handle.seek(span.offset)
            entry = {"offset": span.offset, "bytes": span.length,
                     "sha256": hashlib.sha256(handle.read(span.length)).hexdigest()}
            return {**entry, "rows": list(span.rows)} if rows else entry

        record["parts"] = [part(span, True) for span in groups]
        record["tail"] = part(tail, False)
    return record


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(folder / "write-probe")  # unique: writers probe at once
        try:
            probe.write_bytes(b"")
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise MnistAnnError(f"store {folder} is not writable ({exc.strerror or exc}); choose "
                            f"another with --store or {STORE_ENV}") from exc


def write_table(path: Path, table: Table) -> None:
    with atomic_path(path) as tmp:
        write_parquet(table, tmp)


def damaged_manifest(path: Path, problem: str, error: type = DataError) -> MnistAnnError:
    """The error for a manifest that cannot be used, with the remedy that works."""
    return error(f"{path}: {problem}; restore it, or drop the collection with `mnist-ann drop "
                 f"{path.parent.name}{store_flag(path.parent.parent)}` and build it again")


def read_manifest(path: Path) -> dict:
    """A collection's manifest, checked: JSON, the current schema, and every file it names a
    plain name inside the collection."""
    name = path.parent.name
    try:
        if path.stat().st_size > MANIFEST_LIMIT:
            raise damaged_manifest(path, f"{path.stat().st_size:,} bytes is no manifest")
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise MnistAnnError(f"no collection {name!r} in store {path.parent.parent}; create "
                            "it with `mnist-ann build`") from None
    except (OSError, ValueError) as exc:
        raise damaged_manifest(path, f"unreadable manifest ({exc})") from exc
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version == 1:
        raise DataError(f"{path}: collection {name!r} has the older schema 1 (pixels as "
                        f"lists, slow to read); upgrade it in place with `mnist-ann upgrade "
                        f"{name}`")
    if version != SCHEMA_VERSION:
        raise damaged_manifest(path, f"schema version {version!r}, where this mnist-ann reads "
                                     f"{SCHEMA_VERSION}")
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict, path: Path) -> None:
    """Refuse a manifest whose structure is off or that names a file outside its folder."""
    files, indexes = manifest.get("files"), manifest.get("indexes", {})
    if not isinstance(files, dict) or not isinstance(indexes, dict) or not all(
            isinstance(record, dict) and isinstance(record.get("sha256"), str)
            for record in files.values()) or not all(
            isinstance(entry, dict) for entry in indexes.values()):
        raise damaged_manifest(path, "the manifest's files or indexes are malformed")
    named = list(files) + [name for entry in indexes.values() for name in owned_files(entry)]
    for filename in named:
        if not isinstance(filename, str) or not _FILE_PATTERN.match(filename):
            raise damaged_manifest(path, f"the manifest names a file {filename!r} that is not "
                                         "a plain file name in the collection", IntegrityError)


def owned_files(entry: dict) -> list:
    """The files an index entry owns: the index (or its shard list and shards) and its build
    record."""
    return [*(entry[key] for key in ("file", "record") if key in entry),
            *entry.get("shard_files", [])]


def resident_bytes(entry: dict, n_train: int) -> int:
    """What classifying with an index keeps in memory, as `tune --max-memory` and `export`
    count it: the index file, one byte a label, and, unless it ranks by its own codes, the
    training pixels its exact ranking reads (784 bytes a row; a re-rank that works in float32
    may hold a copy of them as well, which is not counted)."""
    features = 0 if entry.get("rank_space") == "codes" else n_train * N_PIXELS
    return int(entry["bytes"]) + n_train + features


@dataclass(frozen=True)
class StoredIndex:
    """A FAISS index read from a collection, verified against its manifest entry and build
    record."""

    name: str
    entry: dict
    index: object  # faiss.Index; for a sharded index, the first shard's
    shards: tuple = ()  # a sharded index's ShardFile entries, in row order

    @property
    def space_key(self) -> str:
        """A file-name-safe key of the space the index ranks in: `pixels`, `deskew`, or, when
        its own fitted transforms take part, the pipeline with the index file's checksum."""
        key = "-".join(self.entry.get("pipeline") or []) or "pixels"
        if self.entry.get("rank_space") in ("index", "codes"):
            return f"{key}-{self.entry['sha256'][:12]}"
        return key


@dataclass(frozen=True)
class ShardFile:
    """One shard of a sharded index: its file, checksum and training rows [start, stop)."""

    file: str
    sha256: str
    rows: tuple[int, int]


@dataclass
class Change:
    """A change of a collection in progress: the manifest as it was on disk when the lock was
    taken, and files to delete once the changed manifest is saved."""

    manifest: dict
    obsolete: list[str] = field(default_factory=list)


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
        if not (root / MANIFEST).is_file():
            known = ", ".join(c.name for c in list_collections(Path(store))) or "none yet"
            raise MnistAnnError(f"no collection {name!r} in store {store} (known: {known}); "
                                "create it with `mnist-ann build`")
        return cls(root, read_manifest(root / MANIFEST))

    def refresh(self) -> None:
        """Read the manifest again (another command may have changed the collection)."""
        self.manifest = read_manifest(self.root / MANIFEST)

    # --- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, log: Log = silent) -> Iterator[Change]:
        """Change the collection under its lock.

        The block gets the manifest as it is on disk now (never a copy read minutes ago),
        writes its files and changes the manifest; on leaving, the manifest is saved (the
        last write), becomes this object's, and the files the change made obsolete are
        deleted. If the block fails, nothing is saved.
        """
        with locked(self.root, log):
            change = Change(read_manifest(self.root / MANIFEST))
            yield change
            checkpoint("saving")
            write_json(self.root / MANIFEST, change.manifest)
            self.manifest = change.manifest
            referenced = set(change.manifest["files"])
            for filename in change.obsolete:
                if filename not in referenced:
                    (self.root / filename).unlink(missing_ok=True)
            checkpoint("saved")

    def record(self, manifest: dict, filename: str, record: dict | None = None) -> dict:
        """Record a written file (its sha256 and size) in `manifest`."""
        record = record or file_record(self.root / filename)
        manifest["files"][filename] = record
        return record

    # --- verified reading ----------------------------------------------------------------

    def _record(self, filename: str) -> dict:
        record = self.manifest["files"].get(filename)
        if record is None:
            raise IntegrityError(f"{self.root / filename} is not recorded in the manifest; "
                                 f"{self.remedy(filename)}")
        return record

    def _damaged(self, path: Path, problem: str) -> IntegrityError:
        return IntegrityError(f"{path} {problem}; {self.remedy(path.name)}")

    def rebuild_command(self) -> str:
        """The build command that makes this collection again: its split and its indexes."""
        split = self.manifest.get("split", {})
        options = f"--split {split.get('kind', 'seed')}"
        if split.get("kind") == "seed":
            options += (f" --test-size {split.get('test_size')} --random-state "
                        f"{split.get('random_state')}")
        options += "".join(f" {index_option(name, entry)}"
                           for name, entry in self.indexes.items())
        return f"mnist-ann build --collection {self.name} {options}{store_flag(self.root.parent)}"

    def remedy(self, filename: str) -> str:
        """What to do about a damaged or missing file: a command that works as it stands."""
        for name, entry in self.indexes.items():
            if filename in (entry.get("file"), entry.get("record")):
                return (f"rebuild the index with `mnist-ann build --collection {self.name} "
                        f"{index_option(name, entry)} --force{store_flag(self.root.parent)}`")
        return (f"drop and rebuild the collection: `mnist-ann drop {self.name}"
                f"{store_flag(self.root.parent)}`, then `{self.rebuild_command()}`")

    def read_verified(self, filename: str) -> bytes:
        """A recorded file's bytes, after checking their sha256 against the manifest."""
        record = self._record(filename)
        path = self.root / filename
        try:
            if path.stat().st_size != record.get("bytes", path.stat().st_size):
                raise self._damaged(path, f"is {path.stat().st_size:,} bytes, not the "
                                          f"{record['bytes']:,} recorded")
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

    def train_rows(self, start: int, stop: int) -> Table:
        """Training rows [start, stop) alone (a shard's): only the parts (row groups) that
        hold them are read, each checked against its sha256 in the manifest, and decoded
        from the checked bytes. Memory and hashing follow the rows asked for, not the table.
        (A table recorded without parts is checked whole, on the open file.)"""
        record = self._record(TRAIN_FILE)
        path = self.root / TRAIN_FILE
        if "parts" not in record:
            return self._train_rows_checked_whole(record, path, start, stop)
        parts, tail = self._parts(record, path)
        wanted = [part for part in parts if part["rows"][0] < stop and part["rows"][1] > start]
        spans = {}
        try:
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size != record["bytes"]:
                    raise self._damaged(path, f"is not the {record['bytes']:,} bytes recorded")
                for part in [tail, *wanted]:
                    handle.seek(part["offset"])
                    data = handle.read(part["bytes"])
                    if hashlib.sha256(data).hexdigest() != part["sha256"]:
                        raise self._damaged(path, f"fails the checksum of its bytes "
                                                  f"{part['offset']:,} to "
                                                  f"{part['offset'] + part['bytes']:,} (changed "
                                                  "since it was written)")
                    spans[part["offset"]] = data
        except FileNotFoundError:
            raise self._damaged(path, "is missing") from None
        return read_rows(PartsFile(record["bytes"], spans), start, stop, str(path))

    def _parts(self, record: dict, path: Path) -> tuple[list[dict], dict]:
        """A table record's parts and tail, checked to be spans of the file that cover its
        rows in order (a hand-edited manifest gets a clear error, not a wild read)."""
        parts, tail = record.get("parts"), record.get("tail")

        def span(item, rows: bool) -> bool:
            return (isinstance(item, dict) and isinstance(item.get("sha256"), str)
                    and all(isinstance(item.get(key), int) and item[key] >= 0
                            for key in ("offset", "bytes"))
                    and item["offset"] + item["bytes"] <= record["bytes"]
                    and (not rows or (isinstance(item.get("rows"), list)
                                      and len(item["rows"]) == 2
                                      and all(isinstance(r, int) for r in item["rows"]))))

        if not (isinstance(parts, list) and parts and all(span(p, True) for p in parts)
                and span(tail, False)):
            raise self._damaged(path, "has malformed parts in the manifest")
        starts = [part["rows"][0] for part in parts]
        stops = [part["rows"][1] for part in parts]
        if starts[0] != 0 or stops[-1] != self.manifest["rows"]["train"] or starts[1:] != \
                stops[:-1] or any(a >= b for a, b in zip(starts, stops, strict=True)):
            raise self._damaged(path, "has parts in the manifest that do not cover its rows")
        return parts, tail

    def _train_rows_checked_whole(self, record: dict, path: Path, start: int,
                                  stop: int) -> Table:
        try:
            handle = open(path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise self._damaged(path, "is missing") from None
        with handle:
            before = os.fstat(handle.fileno())
            if sha256_handle(handle) != record["sha256"]:
                raise self._damaged(path, "fails its checksum (changed since it was written)")
            handle.seek(0)
            rows = read_rows(handle, start, stop, str(path))
            after = os.fstat(handle.fileno())
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise self._damaged(path, "was changed while it was being read")
        return rows

    def test(self) -> Table:
        return self.table(TEST_FILE)

    def load_index(self, name: str) -> StoredIndex:
        """Index `name`, read only after its file passes the manifest's sha256 and its build
        record agrees with the manifest entry.

        If its file was replaced since this object read the manifest (another command rebuilt
        it), the manifest is read again and the new file is loaded.
        """
        entry = self._entry(name)
        if not (self.root / entry.get("file", "")).is_file():
            self.refresh()
            entry = self._entry(name)
        check_build_record(self, name, entry)
        recorded = self.manifest["files"].get(entry["file"], {}).get("sha256")
        if recorded != entry.get("sha256"):
            raise self._damaged(self.root / entry["file"],
                                "is not the file the manifest's index entry names")
        if int(entry.get("shards", 1)) > 1:
            shards = self.shard_files(name)
            return StoredIndex(name, entry, [self.read_shard(shard) for shard in shards],
                               shards)
        return StoredIndex(name, entry, self._read_index(self.root / entry["file"],
                                                          entry["sha256"]))

    def shard_files(self, name: str) -> tuple[ShardFile, ...]:
        """The shards of sharded index `name`, from its shard list (verified against the
        manifest, which the build record binds), each checked to be recorded as listed."""
        entry = self._entry(name)
        path = self.root / entry["file"]
        try:
            listed = json.loads(self.read_verified(entry["file"]))["shards"]
            shards = tuple(ShardFile(item["file"], item["sha256"],
                                     (int(item["rows"][0]), int(item["rows"][1])))
                           for item in listed)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise self._damaged(path, f"is not a shard list ({exc})") from exc
        expected_start = 0
        for shard in shards:
            if not _FILE_PATTERN.match(shard.file) or self.manifest["files"].get(
                    shard.file, {}).get("sha256") != shard.sha256:
                raise self._damaged(self.root / shard.file,
                                    "is not the shard file its shard list names")
            if shard.rows[0] != expected_start or shard.rows[1] <= shard.rows[0]:
                raise self._damaged(path, "lists shards whose rows are not contiguous")
            expected_start = shard.rows[1]
        if expected_start != entry.get("ntotal"):
            raise self._damaged(path, f"lists {expected_start:,} rows, not the index's "
                                      f"{entry.get('ntotal')}")
        return shards

    def read_shard(self, shard: ShardFile) -> object:
        """One shard's FAISS index, read only after its checksum passes."""
        return self._read_index(self.root / shard.file, shard.sha256)

    def _entry(self, name: str) -> dict:
        entry = self.indexes.get(name)
        if not isinstance(entry, dict):
            known = ", ".join(self.indexes) or "none built yet"
            raise MnistAnnError(f"collection {self.name!r} has no index {name!r} (built: "
                                f"{known}); build it with `mnist-ann build --index`")
        return entry

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
                    reader = faiss.PyCallbackIOReader(handle.read, 1 << 22)
                    index = faiss.read_index(reader)
                    del reader
            except RuntimeError as exc:  # not expected after the checksum: a FAISS mismatch
                raise self._damaged(path, f"cannot be read by this FAISS ({exc})") from exc
            after = os.fstat(handle.fileno())
        if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
                after.st_size, after.st_mtime_ns, after.st_ctime_ns):
            raise self._damaged(path, "was changed while it was being read")
        return index

    # --- checking ------------------------------------------------------------------------

    def problems(self) -> list[dict]:
        """Every file that differs from the manifest or its build record: [{file, problem}]."""
        found = []
        for filename, record in self.manifest["files"].items():
            path = self.root / filename
            if not path.is_file():
                found.append({"file": filename, "problem": "missing"})
            elif path.stat().st_size != record.get("bytes", path.stat().st_size):
                found.append({"file": filename, "problem": f"{path.stat().st_size:,} bytes, "
                                                           f"not {record['bytes']:,}"})
            elif sha256_file(path) != record["sha256"]:
                found.append({"file": filename, "problem": "fails its checksum"})
        damaged = {problem["file"] for problem in found}
        for name, entry in self.indexes.items():
            if entry.get("record") in damaged or entry.get("file") in damaged:
                continue
            try:
                check_build_record(self, name, entry)
            except MnistAnnError as exc:
                found.append({"file": entry.get("record") or entry.get("file") or name,
                              "problem": str(exc)})
        for problem in found:
            problem["remedy"] = self.remedy(problem["file"])
        return found

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
    rebuild = f"rebuild it with `mnist-ann build --collection {collection.name} " \
              f"{index_option(name, entry)} --force{store_flag(collection.root.parent)}`"
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


def collection_names(store: Path) -> list[str]:
    """The folders of `store` that hold a manifest, sorted (whether or not it is sound)."""
    if not store.is_dir():
        return []
    return [child.name for child in sorted(store.iterdir()) if (child / MANIFEST).is_file()]


def list_collections(store: Path) -> list[Collection]:
    """The collections of `store` that open (a damaged manifest is `verify`'s business)."""
    found = []
    for name in collection_names(store):
        with contextlib.suppress(MnistAnnError):
            found.append(Collection.open(store, name))
    return found
