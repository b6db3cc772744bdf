"""Train, add and write FAISS indexes into a collection."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from mnist_ann.errors import InvalidArgument, MnistAnnError
from mnist_ann.fileio import remove_stale_temporaries, write_named_by_content
from mnist_ann.pipeline import apply_pipeline
from mnist_ann.recipes import DIMENSION, Recipe, check_trainable, index_layers
from mnist_ann.store import TEST_FILE, TRAIN_FILE, Collection, ensure_writable

ADD_BATCH = 8192

Log = Callable[[str], None]


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


def simd_level() -> str:
    """The SIMD level FAISS runs with (AVX2, AVX512, NEON, ...)."""
    config = getattr(faiss, "SIMDConfig", None)
    if config is not None and hasattr(config, "get_level_name"):
        return str(config.get_level_name())
    options = faiss.get_compile_options().split()
    return next((o for o in options if o not in ("OPTIMIZE", "DD")), "generic")


def default_threads() -> int:
    return os.cpu_count() or 1


_blas_threads: int | None = None


def set_threads(threads: int) -> int:
    """Let FAISS (OpenMP) and numpy's BLAS use `threads` threads."""
    global _blas_threads
    if threads < 1:
        raise InvalidArgument(f"threads must be at least 1, not {threads}")
    faiss.omp_set_num_threads(threads)
    if threads != _blas_threads:  # threadpoolctl takes about 0.6 ms: only on a change
        threadpool_limits(threads, user_api="blas")
        _blas_threads = threads
    return threads


@dataclass(frozen=True)
class BuildResult:
    name: str
    status: str  # "built" or "kept"
    entry: dict


def check_clashes(collection: Collection, recipes: list[Recipe], force: bool) -> None:
    """Refuse, before anything is built, to replace an index built from another recipe."""
    for recipe in recipes:
        entry = collection.indexes.get(recipe.name)
        if entry is not None and not force and _spec(entry) != _spec(recipe.spec()):
            raise MnistAnnError(f"index {recipe.name!r} exists with factory {entry['factory']!r} "
                                f"{entry['build_args']}; use --force to replace it, or another "
                                "name")


SPEC_FIELDS = ("recipe", "factory", "build_args", "pipeline", "rank_space", "certified")
RECORD_SUFFIX = ".build.json"


def _spec(entry: dict) -> dict:
    return {field: entry.get(field) for field in SPEC_FIELDS}


def is_current(collection: Collection, recipe: Recipe) -> bool:
    entry = collection.indexes.get(recipe.name)
    train_sha = collection.manifest["files"][TRAIN_FILE]["sha256"]
    return (entry is not None and _spec(entry) == _spec(recipe.spec())
            and entry["train_sha256"] == train_sha
            and (collection.root / entry["file"]).is_file())


def make_index(recipe: Recipe) -> faiss.Index:
    index = faiss.index_factory(DIMENSION, recipe.factory, faiss.METRIC_L2)
    for layer in index_layers(index):
        if isinstance(layer, faiss.IndexHNSW) and "efConstruction" in recipe.build_args:
            layer.hnsw.efConstruction = int(recipe.build_args["efConstruction"])
    return index


def train_and_add(index: faiss.Index, vectors: np.ndarray, label: str, log: Log,
                  progress: Progress) -> None:
    if not index.is_trained:
        log(f"{label}: training on {len(vectors):,} vectors")
        try:
            index.train(vectors)
        except RuntimeError as exc:
            raise MnistAnnError(f"{label}: FAISS could not train: "
                                f"{str(exc).strip().splitlines()[-1]}") from exc
    with progress(f"{label}: adding", len(vectors)) as bar:
        for start in range(0, len(vectors), ADD_BATCH):
            batch = vectors[start:start + ADD_BATCH]
            index.add(batch)
            bar.update(len(batch))


def build_one(collection: Collection, recipe: Recipe, vectors: np.ndarray, threads: int,
              log: Log, progress: Progress) -> dict:
    """Build one index, write its file, and return its manifest entry (not yet saved)."""
    started = time.perf_counter()
    index = make_index(recipe)
    train_and_add(index, vectors, recipe.name, log, progress)
    seconds = time.perf_counter() - started
    filename, digest = write_named_by_content(
        collection.root, recipe.name, ".faiss", lambda path: faiss.write_index(index, str(path)))
    # the build record binds the recipe (pipeline included) to the index file's checksum, so
    # that a manifest edited after the build cannot send queries through another pipeline
    record = json.dumps({**recipe.spec(), "index_sha256": digest}, indent=2, sort_keys=True)
    record_file, _ = write_named_by_content(collection.root, recipe.name, RECORD_SUFFIX,
                                            lambda path: path.write_text(record + "\n"))
    return {
        **recipe.spec(),
        "file": filename,
        "record": record_file,
        "search_defaults": recipe.search_defaults,
        "search_grid": recipe.search_grid,
        "train_sha256": collection.manifest["files"][TRAIN_FILE]["sha256"],
        "ntotal": int(index.ntotal),
        "build_seconds": round(seconds, 3),
        "bytes": (collection.root / filename).stat().st_size,
        "sha256": digest,
        "faiss_version": faiss.__version__,
        "simd": simd_level(),
        "threads": threads,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def remove_unrecorded_indexes(collection: Collection) -> None:
    """Delete index files the manifest does not name (left by a build killed mid-way)."""
    for pattern in ("*.faiss", f"*{RECORD_SUFFIX}"):
        for path in collection.root.glob(pattern):
            if path.name not in collection.manifest["files"]:
                path.unlink()


def built_files(entry: dict) -> list[str]:
    """The files an index entry owns: the index and its build record."""
    return [entry[key] for key in ("file", "record") if key in entry]


def build_indexes(collection: Collection, recipes: list[Recipe], threads: int | None = None,
                  force: bool = False, log: Log = lambda message: None,
                  progress: Progress = no_progress) -> list[BuildResult]:
    """Build each recipe into the collection; keep indexes that are already current.

    Each index file is written under its content hash and the manifest is saved after it, so
    an interrupted build leaves the previous indexes and manifest whole.
    """
    threads = set_threads(threads or default_threads())
    names = [recipe.name for recipe in recipes]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"index names repeat: {', '.join(names)}")
    check_clashes(collection, recipes, force)
    for filename in (TRAIN_FILE, TEST_FILE):
        collection.verified(filename)
    n_train = collection.manifest["rows"]["train"]
    for recipe in recipes:
        check_trainable(recipe, n_train)
    ensure_writable(collection.root)
    remove_stale_temporaries(collection.root)
    remove_unrecorded_indexes(collection)
    vectors: dict[tuple[str, ...], np.ndarray] = {}
    results = []
    for recipe in recipes:
        if not force and is_current(collection, recipe):
            log(f"{recipe.name}: already built from this recipe and training table; kept "
                "(--force rebuilds)")
            results.append(BuildResult(recipe.name, "kept", collection.indexes[recipe.name]))
            continue
        if recipe.pipeline not in vectors:
            if recipe.pipeline:
                log(f"{recipe.name}: applying {', '.join(recipe.pipeline)} to the training set")
            vectors[recipe.pipeline] = apply_pipeline(recipe.pipeline, collection.train().pixels)
        entry = build_one(collection, recipe, vectors[recipe.pipeline], threads, log, progress)
        previous = collection.indexes.get(recipe.name)
        collection.indexes[recipe.name] = entry
        for filename in built_files(entry):
            collection.record_file(filename)
        stale = [f for f in built_files(previous or {}) if f not in built_files(entry)]
        for filename in stale:
            collection.manifest["files"].pop(filename, None)
        collection.save()
        for filename in stale:
            (collection.root / filename).unlink(missing_ok=True)
        log(f"{recipe.name}: {entry['ntotal']:,} vectors in {entry['build_seconds']:.1f} s, "
            f"{entry['bytes'] / 1e6:.1f} MB")
        results.append(BuildResult(recipe.name, "built", entry))
    return results
