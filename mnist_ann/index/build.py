"""Train, add and write FAISS indexes: in memory, and into a collection."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from mnist_ann.data.pipeline import apply_pipeline
from mnist_ann.errors import InvalidArgument, MnistAnnError
from mnist_ann.fileio import checkpoint, remove_stale_temporaries, write_named_by_content
from mnist_ann.index.layers import drop_pca_rotations, index_layers, make_factory_index
from mnist_ann.index.recipes import Recipe, check_trainable, focused_grid
from mnist_ann.index.sharded import shard_ranges
from mnist_ann.machine import simd_level
from mnist_ann.runtime import Log, Progress, faiss_threads, no_progress, silent
from mnist_ann.store.collection import (
    RECORD_SUFFIX,
    SHARD_LIST_SUFFIX,
    SPEC_FIELDS,
    TEST_FILE,
    TRAIN_FILE,
    Collection,
    ensure_writable,
    owned_files,
)

ADD_BATCH = 8192
# above this many rows an index is trained on a seeded sample (3.3 GB of float32 pixels):
# k-means samples far fewer anyway, and a PCA's axes are settled long before
TRAIN_SAMPLE = 2**20
TRAIN_SAMPLE_SEED = 0


@dataclass(frozen=True)
class BuildResult:
    name: str
    status: str  # "built" or "kept"
    entry: dict


def make_index(recipe: Recipe, dimension: int) -> faiss.Index:
    index = make_factory_index(dimension, recipe.factory)
    for layer in index_layers(index):
        if isinstance(layer, faiss.IndexHNSW) and "efConstruction" in recipe.build_args:
            layer.hnsw.efConstruction = int(recipe.build_args["efConstruction"])
    return index


def training_sample(vectors: np.ndarray) -> np.ndarray:
    """The rows an index is trained on, as float32: all of them up to TRAIN_SAMPLE, else a
    seeded sample of TRAIN_SAMPLE (in row order), so that training memory stays bounded."""
    if len(vectors) > TRAIN_SAMPLE:
        rows = np.sort(np.random.default_rng(TRAIN_SAMPLE_SEED).choice(
            len(vectors), TRAIN_SAMPLE, replace=False))
        vectors = vectors[rows]
    return np.ascontiguousarray(vectors, dtype=np.float32)


def train_index(index: faiss.Index, vectors: np.ndarray, label: str, log: Log = silent) -> None:
    if not index.is_trained:
        sample = training_sample(vectors)
        log(f"{label}: training on {len(sample):,} vectors"
            + (f" (a seeded sample of {len(vectors):,})" if len(sample) < len(vectors) else ""))
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise MnistAnnError(f"{label}: FAISS could not train: "
                                f"{str(exc).strip().splitlines()[-1]}") from exc
        drop_pca_rotations(index)


def train_and_add(index: faiss.Index, vectors: np.ndarray, label: str, log: Log = silent,
                  progress: Progress = no_progress) -> None:
    train_index(index, vectors, label, log)
    with progress(f"{label}: adding", len(vectors)) as bar:
        for start in range(0, len(vectors), ADD_BATCH):
            # float32 a batch at a time: millions of pixel rows are never all float32 at once
            batch = np.ascontiguousarray(vectors[start:start + ADD_BATCH], dtype=np.float32)
            index.add(batch)
            bar.update(len(batch))
            checkpoint(f"added:{label}")


def fill_shard(template: bytes, vectors: np.ndarray, label: str = "shard") -> memoryview:
    """A shard: the trained, empty template index with `vectors` added, serialized."""
    index = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
    train_and_add(index, vectors, label)
    return memoryview(faiss.serialize_index(index))


def build_shards(recipe: Recipe, vectors: np.ndarray, ranges: list[tuple[int, int]],
                 log: Log = silent, fill=None) -> list[memoryview]:
    """The shards of `recipe` over `vectors`: one index trained on all of them (as the
    unsharded build trains), then each shard filled with its range from that same trained
    index, so that IVF shards together hold what the unsharded IVF holds. `fill(template,
    vectors, ranges, label)` fills them elsewhere (a cluster); by default, here."""
    template = make_index(recipe, vectors.shape[1])
    train_index(template, vectors, recipe.name, log)
    data = bytes(faiss.serialize_index(template))
    del template
    log(f"{recipe.name}: filling {len(ranges)} shards of about {len(vectors) // len(ranges):,} "
        "rows")
    if fill is not None:
        return fill(data, vectors, ranges, recipe.name)
    return [fill_shard(data, vectors[start:stop], f"{recipe.name} shard {number}")
            for number, (start, stop) in enumerate(ranges)]


def build_in_memory(recipe: Recipe, vectors: np.ndarray, threads: int | None = None,
                    log: Log = silent, progress: Progress = no_progress) -> faiss.Index:
    """An index of `recipe` over float32 vectors [n, d] (already through its pipeline)."""
    check_trainable(recipe, len(vectors), vectors.shape[1])
    with faiss_threads(threads):
        index = make_index(recipe, vectors.shape[1])
        train_and_add(index, vectors, recipe.name, log, progress)
    return index


def check_clashes(manifest: dict, recipes: list[Recipe], force: bool) -> None:
    """Refuse, before anything is built, to replace an index built from another recipe."""
    for recipe in recipes:
        entry = manifest["indexes"].get(recipe.name)
        if entry is not None and not force and _spec(entry) != _spec(recipe.spec()):
            raise MnistAnnError(f"index {recipe.name!r} exists with factory {entry['factory']!r} "
                                f"{entry['build_args']}; use --force to replace it, or another "
                                "name")


def _spec(entry: dict) -> dict:
    return {field: entry.get(field) for field in SPEC_FIELDS}


def is_current(collection: Collection, recipe: Recipe) -> bool:
    entry = collection.indexes.get(recipe.name)
    train_sha = collection.manifest["files"][TRAIN_FILE]["sha256"]
    return (entry is not None and _spec(entry) == _spec(recipe.spec())
            and entry["train_sha256"] == train_sha
            and (collection.root / entry["file"]).is_file())


def write_index(collection: Collection, manifest: dict, recipe: Recipe, data: memoryview,
                seconds: float, ntotal: int, threads: int) -> dict:
    """Write an index file (FAISS's serialized bytes) and its build record, record both in
    `manifest`; return the index's manifest entry.

    The bytes are written with Python's I/O (not FAISS's writer, which only prints "close
    error" when the last flush fails), made durable, and hashed once, from the bytes written.
    """
    filename, digest = write_named_by_content(collection.root, recipe.name, ".faiss", data)
    collection.record(manifest, filename, {"sha256": digest, "bytes": len(data)})
    return _index_entry(collection, manifest, recipe, filename, digest, len(data), seconds,
                        ntotal, threads)


def write_sharded_index(collection: Collection, manifest: dict, recipe: Recipe,
                        shards: list[memoryview], ranges: list[tuple[int, int]],
                        seconds: float, threads: int) -> dict:
    """Write each shard's file and the shard list naming them (their rows and sha256), and
    record all in `manifest`; the index entry's file is the list, its build record binds the
    list's checksum, so every shard is bound through it."""
    listed = []
    for number, (data, (start, stop)) in enumerate(zip(shards, ranges, strict=True)):
        filename, digest = write_named_by_content(collection.root, f"{recipe.name}.s{number}",
                                                  ".faiss", data)
        collection.record(manifest, filename, {"sha256": digest, "bytes": len(data)})
        listed.append({"file": filename, "sha256": digest, "bytes": len(data),
                       "rows": [start, stop]})
    shard_list = (json.dumps({"shards": listed}, indent=2) + "\n").encode()
    list_file, list_digest = write_named_by_content(collection.root, recipe.name,
                                                    SHARD_LIST_SUFFIX, shard_list)
    collection.record(manifest, list_file, {"sha256": list_digest, "bytes": len(shard_list)})
    entry = _index_entry(collection, manifest, recipe, list_file, list_digest,
                         sum(len(data) for data in shards), seconds, ranges[-1][1], threads)
    entry["shard_files"] = [shard["file"] for shard in listed]
    return entry


def _index_entry(collection: Collection, manifest: dict, recipe: Recipe, filename: str,
                 digest: str, size: int, seconds: float, ntotal: int, threads: int) -> dict:
    # the build record binds the recipe (pipeline included) to the index file's checksum, so
    # that a manifest edited after the build cannot send queries through another pipeline
    record = json.dumps({**recipe.spec(), "index_sha256": digest}, indent=2, sort_keys=True)
    record_bytes = (record + "\n").encode()
    record_file, record_digest = write_named_by_content(collection.root, recipe.name,
                                                        RECORD_SUFFIX, record_bytes)
    collection.record(manifest, record_file, {"sha256": record_digest,
                                              "bytes": len(record_bytes)})
    return {
        **recipe.spec(),
        "file": filename,
        "record": record_file,
        "builtin": recipe.builtin,
        "search_defaults": recipe.search_defaults,
        "search_grid": recipe.search_grid,
        "focus_grid": recipe.focus_grid or focused_grid(recipe.search_grid),
        "train_sha256": manifest["files"][TRAIN_FILE]["sha256"],
        "ntotal": ntotal,
        "build_seconds": round(seconds, 3),
        "bytes": size,
        "sha256": digest,
        "faiss_version": faiss.__version__,
        "simd": simd_level(),
        "threads": threads,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def sweep_leftovers(root: Path, manifest: dict) -> None:
    """Delete what killed writers left: temporaries of processes that are gone, and index
    files the manifest does not name. Only under the lock: a live writer writes and records
    its files while it holds it."""
    remove_stale_temporaries(root)
    for pattern in ("*.faiss", f"*{RECORD_SUFFIX}", f"*{SHARD_LIST_SUFFIX}"):
        for path in root.glob(pattern):
            if path.name not in manifest["files"]:
                path.unlink()


def build_indexes(collection: Collection, recipes: list[Recipe], threads: int | None = None,
                  force: bool = False, log: Log = silent,
                  progress: Progress = no_progress, fill=None) -> list[BuildResult]:
    """Build each recipe into the collection; keep indexes that are already current.

    Each index is built without the collection's lock; its files are then written and
    recorded under the lock, on the manifest as it is then (another command may have added
    indexes meanwhile), and the manifest saved. An interrupted build leaves the previous
    indexes and manifest whole.
    """
    names = [recipe.name for recipe in recipes]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"index names repeat: {', '.join(names)}")
    collection.refresh()
    check_clashes(collection.manifest, recipes, force)
    for filename in (TRAIN_FILE, TEST_FILE):
        collection.verified(filename)
    n_train = collection.manifest["rows"]["train"]
    for recipe in recipes:
        check_trainable(recipe, n_train)
    ensure_writable(collection.root)
    with collection.writing(log) as change:
        sweep_leftovers(collection.root, change.manifest)
    vectors: dict[tuple[str, ...], np.ndarray] = {}
    results = []
    with faiss_threads(threads) as used:
        for recipe in recipes:
            if not force and is_current(collection, recipe):
                log(f"{recipe.name}: already built from this recipe and training table; kept "
                    "(--force rebuilds)")
                results.append(BuildResult(recipe.name, "kept", collection.indexes[recipe.name]))
                continue
            if recipe.pipeline not in vectors:
                if recipe.pipeline:
                    log(f"{recipe.name}: applying {', '.join(recipe.pipeline)} to the training "
                        "set")
                # the pixels themselves without a pipeline: they become float32 a batch at
                # a time, never all at once (12.6 GB for four million rows)
                pixels = collection.train().pixels
                vectors[recipe.pipeline] = (apply_pipeline(recipe.pipeline, pixels)
                                            if recipe.pipeline else pixels)
            started = time.perf_counter()
            if recipe.shards > 1:
                ranges = shard_ranges(len(vectors[recipe.pipeline]), recipe.shards)
                data = build_shards(recipe, vectors[recipe.pipeline], ranges, log, fill)
            else:
                index = make_index(recipe, vectors[recipe.pipeline].shape[1])
                train_and_add(index, vectors[recipe.pipeline], recipe.name, log, progress)
                ntotal = int(index.ntotal)
                data = memoryview(faiss.serialize_index(index))
                del index
            seconds = time.perf_counter() - started
            with collection.writing(log) as change:
                manifest = change.manifest
                check_clashes(manifest, [recipe], force)  # another command may have built it
                if recipe.shards > 1:
                    entry = write_sharded_index(collection, manifest, recipe, data, ranges,
                                                seconds, used)
                else:
                    entry = write_index(collection, manifest, recipe, data, seconds, ntotal,
                                        used)
                previous = manifest["indexes"].get(recipe.name)
                manifest["indexes"][recipe.name] = entry
                stale = [f for f in owned_files(previous or {}) if f not in owned_files(entry)]
                for filename in stale:
                    manifest["files"].pop(filename, None)
                change.obsolete += stale
            del data
            log(f"{recipe.name}: {entry['ntotal']:,} vectors in {entry['build_seconds']:.1f} s, "
                f"{entry['bytes'] / 1e6:.1f} MB")
            results.append(BuildResult(recipe.name, "built", entry))
    return results
