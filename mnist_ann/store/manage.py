"""Making, upgrading, checking and dropping collections: each under the collection's lock."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from mnist_ann.data.mnist import FINGERPRINT, Dataset, Split, load_mnist
from mnist_ann.data.tables import Table, arrow_to_table, read_arrow
from mnist_ann.errors import DataError, IntegrityError, MnistAnnError
from mnist_ann.fileio import remove_stale_temporaries, write_json
from mnist_ann.runtime import Log, silent
from mnist_ann.store.collection import (
    MANIFEST,
    SCHEMA_VERSION,
    TEST_FILE,
    TRAIN_FILE,
    Collection,
    ensure_writable,
    owned_files,
    table_record,
    validate_name,
    write_table,
)
from mnist_ann.store.lock import locked


def create_collection(store: Path, name: str, dataset: Dataset, split: Split,
                      log: Log = silent) -> Collection:
    """Write the split's train and test tables and a fresh manifest into store/name."""
    validate_name(name)
    ensure_writable(store)
    root = store / name
    fresh_folder = not root.exists()
    try:
        root.mkdir(exist_ok=True)
        with locked(root, log):
            if (root / MANIFEST).exists():
                raise MnistAnnError(f"collection {name!r} already exists in {store}")
            remove_stale_temporaries(root)
            train_ids, test_ids = split.ids(len(dataset.labels))
            started = time.perf_counter()
            files = {}
            tables = {TRAIN_FILE: training_table(dataset, train_ids, split, log),
                      TEST_FILE: Table(test_ids, dataset.labels[test_ids],
                                       dataset.images[test_ids])}
            for filename, table in tables.items():
                log(f"writing {root / filename} ({len(table):,} rows)")
                write_table(root / filename, table)
                files[filename] = table_record(root / filename)
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "dataset": {"name": "mnist-70k", "fingerprint": FINGERPRINT,
                            "source": dataset.source},
                "split": split.to_dict(),
                "rows": {"train": len(tables[TRAIN_FILE]), "test": len(test_ids)},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
                "indexes": {},
            }
            write_json(root / MANIFEST, manifest)
    except OSError:
        if fresh_folder:
            shutil.rmtree(root, ignore_errors=True)
        raise
    log(f"collection {name!r} written in {time.perf_counter() - started:.1f} s")
    return Collection(root, manifest)


def training_table(dataset: Dataset, train_ids: np.ndarray, split: Split,
                   log: Log = silent) -> Table:
    """The split's training rows, followed by `split.augment` deformed copies of them."""
    from mnist_ann.data.augment import augmented_copies

    table = Table(train_ids, dataset.labels[train_ids], dataset.images[train_ids])
    if not split.augment:
        return table
    log(f"making {split.augment} deformed copies of the {len(train_ids):,} training digits "
        f"(augment seed {split.augment_seed})")
    parts = [table, *(Table(*part) for part in augmented_copies(
        table.ids, table.labels, table.pixels, split.augment, split.augment_seed))]
    return Table(np.concatenate([part.ids for part in parts]),
                 np.concatenate([part.labels for part in parts]),
                 np.concatenate([part.pixels for part in parts]))


def ensure_collection(store: Path, name: str, split: Split, source: str, log: Log = silent,
                      must_match: bool = True) -> Collection:
    """Open collection `name`, or create it from MNIST with `split` if it does not exist.

    With `must_match`, an existing collection must hold `split`. Two commands creating the
    same collection at once make it once: the second finds it made.
    """
    validate_name(name)
    ensure_writable(store)
    if not (store / name / MANIFEST).is_file():
        dataset = load_mnist(source, log=log)
        try:
            return create_collection(store, name, dataset, split, log)
        except MnistAnnError:
            if not (store / name / MANIFEST).is_file():
                raise
    collection = Collection.open(store, name)
    if must_match and collection.split != split:
        raise MnistAnnError(f"collection {name!r} holds split {collection.split.to_dict()}, "
                            f"not {split.to_dict()}; choose another --collection")
    log(f"collection {name!r} exists with split {collection.split.to_dict()}; kept")
    return collection


def upgrade_collection(store: Path, name: str, log: Log = silent) -> bool:
    """Rewrite a schema-1 collection's tables in schema 2, keeping its indexes.

    The rows are read from the old tables (checked against the old manifest), written anew,
    read back and compared; only then is the manifest replaced. Returns False when the
    collection already has the current schema.
    """
    root = Path(store) / validate_name(name)
    path = root / MANIFEST
    if not path.is_file():
        raise MnistAnnError(f"no collection {name!r} in store {store}")
    ensure_writable(root)
    with locked(root, log):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable manifest ({exc})") from exc
        if manifest.get("schema_version") == SCHEMA_VERSION:
            return False
        if manifest.get("schema_version") != 1:
            raise DataError(f"{path}: schema version {manifest.get('schema_version')!r} "
                            "cannot be upgraded; rebuild the collection")
        old = Collection(root, manifest)
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
                raise IntegrityError(f"{root / filename}: the upgraded table differs from the "
                                     "old one; rebuild the collection")
            renamed[manifest["files"][filename]["sha256"]] = old.record(
                manifest, filename, table_record(root / filename))["sha256"]
            log(f"{filename}: rewritten with pixels as fixed_size_binary(784)")
        for entry in manifest.get("indexes", {}).values():
            entry["train_sha256"] = renamed.get(entry.get("train_sha256"),
                                                entry.get("train_sha256"))
        manifest["schema_version"] = SCHEMA_VERSION
        write_json(path, manifest)
    return True


def drop_index(collection: Collection, name: str, log: Log = silent) -> list[str]:
    """Remove index `name` and its files from the collection; returns the files removed."""
    with collection.writing(log) as change:
        entry = change.manifest["indexes"].pop(name, None)
        if entry is None:
            known = ", ".join(change.manifest["indexes"]) or "none"
            raise MnistAnnError(f"collection {collection.name!r} has no index {name!r} "
                                f"(built: {known})")
        owned = owned_files(entry)
        for filename in owned:
            change.manifest["files"].pop(filename, None)
        change.obsolete += owned
    return owned


def drop_collection(store: Path, name: str, log: Log = silent) -> Path:
    """Remove collection `name` and its folder, under its lock (a writer still at work is
    waited for). The manifest goes first, so that what is left is no collection."""
    root = Path(store) / validate_name(name)
    if not (root / MANIFEST).is_file() and not root.is_dir():
        raise MnistAnnError(f"no collection {name!r} in store {store}")
    with locked(root, log):
        (root / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(root)
    return root
