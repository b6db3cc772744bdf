"""The library as others build on it: the top-level API, shared spaces, threads, state."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import exact_knn
from threadpoolctl import threadpool_info

import mnist_ann
from mnist_ann import KNeighborsClassifier, Store
from mnist_ann.errors import MnistAnnError
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import resolve_recipe


def test_store_opens_collections_by_name(shared, use_store, tmp_path: Path) -> None:
    syn = use_store(shared("syn"))
    assert "syn" in Store() and "nosuch" not in Store()
    on_disk = sorted(p.name for p in syn.root.parent.iterdir() if (p / "manifest.json").is_file())
    assert "syn" in on_disk and list(Store()) == on_disk and len(Store()) == len(on_disk)
    seed = Store(syn.root.parent)["syn"]
    assert seed.name == "syn" and set(seed.indexes) == {"flat", "hnsw", "ivf"}
    with pytest.raises(KeyError, match="no collection 'nosuch'"):
        Store()["nosuch"]
    with pytest.raises(MnistAnnError, match="no collection"):
        Store(tmp_path)["syn"]


def test_classifier_methods_agree_with_exact_search(shared) -> None:
    syn = shared("syn")
    train, test = syn.train(), syn.test()
    clf = syn.classifier("flat", k=7, threads=2)
    true_distances, true_rows = exact_knn(train.pixels, test.pixels, 7)
    distances, rows = clf.kneighbors(test.pixels)
    np.testing.assert_array_equal(rows, true_rows)
    np.testing.assert_allclose(distances, np.sqrt(true_distances))
    votes = np.array([np.bincount(train.labels[r], minlength=10) for r in true_rows])
    proba = clf.predict_proba(test.pixels)
    np.testing.assert_allclose(proba, votes / 7)
    np.testing.assert_array_equal(clf.predict(test.pixels), votes.argmax(axis=1))
    assert clf.score(test.pixels, test.labels) == np.mean(votes.argmax(axis=1) == test.labels)
    assert list(clf.classes) == list(range(10))


def test_settings_are_keyword_only_and_checked_when_made(shared) -> None:
    syn = shared("syn")
    with pytest.raises(TypeError):
        syn.classifier("hnsw", 7)  # k must be named
    with pytest.raises(ValueError, match="does not take search parameter 'nprobe'"):
        syn.classifier("hnsw", params={"nprobe": 4})
    with pytest.raises(ValueError, match="k must be between 1"):
        syn.classifier("flat", k=0)
    with pytest.raises(ValueError, match="threads must be"):
        syn.classifier("flat", threads=0)


def test_indexes_ranking_in_pixels_share_one_space_and_one_float32_copy(shared) -> None:
    syn = shared("syn")
    flat, hnsw, ivf = (syn.searcher(name) for name in ("flat", "hnsw", "ivf"))
    assert flat.space is hnsw.space is ivf.space
    # the float32 pixels exact distances are summed from are the flat index's own
    from mnist_ann.index.layers import flat_vectors

    assert np.shares_memory(flat.space.float32, flat_vectors(flat.index))
    assert syn.searcher("flat") is flat  # loaded once


def test_lazy_top_level_names() -> None:
    assert mnist_ann.Store is Store and mnist_ann.KNeighborsClassifier is KNeighborsClassifier
    with pytest.raises(AttributeError):
        _ = mnist_ann.NoSuchThing


NAMES = ["flat", "hnsw", "ivf", "pca-hnsw", "exact-pca"]


@pytest.fixture(scope="module")
def concurrent_collection(shared, tmp_path_factory: pytest.TempPathFactory):
    from conftest import writable_copy

    copy = writable_copy(shared("syn"), tmp_path_factory.mktemp("concurrent"))
    build_indexes(copy, [resolve_recipe(name, len(copy.train()))
                         for name in ("pca-hnsw", "exact-pca")], threads=2)
    return copy


@pytest.mark.parametrize("name", NAMES)
def test_concurrent_searches_equal_serial_ones(concurrent_collection, name: str) -> None:
    """Eight threads share one classifier, with different batches (one to 300 queries)."""
    queries = concurrent_collection.test().pixels
    clf = concurrent_collection.classifier(name, k=5, threads=1)
    batches = [queries[i:i + size] for i, size in
               [(0, 300), (3, 1), (10, 64), (40, 7), (0, 300), (100, 65), (7, 200), (50, 2)]]
    serial = [clf.classify(batch) for batch in batches]
    start = threading.Barrier(len(batches))

    def run(batch: np.ndarray):
        start.wait()
        return [clf.classify(batch) for _ in range(3)]

    with ThreadPoolExecutor(len(batches)) as pool:
        parallel = list(pool.map(run, batches))
    for expected, results in zip(serial, parallel, strict=True):
        for result in results:
            np.testing.assert_array_equal(result.neighbours.rows, expected.neighbours.rows)
            np.testing.assert_array_equal(result.neighbours.distances,
                                          expected.neighbours.distances)
            np.testing.assert_array_equal(result.predictions, expected.predictions)


def process_state() -> dict:
    """What a library call must leave as it found it."""
    return {"omp_threads": faiss.omp_get_max_threads(),
            "blas_threshold": faiss.cvar.distance_compute_blas_threshold,
            "pools": sorted((i["filepath"], i["num_threads"]) for i in threadpool_info())}


def test_library_calls_leave_the_process_as_they_found_it(concurrent_collection) -> None:
    faiss.omp_set_num_threads(2)
    before = process_state()
    queries = concurrent_collection.test().pixels
    for name in NAMES:
        for threads in (1, 2):
            concurrent_collection.classifier(name, threads=threads).classify(queries)
    assert process_state() == before
    faiss.omp_set_num_threads(1)  # and from another starting point
    before = process_state()
    concurrent_collection.classifier("exact-pca", threads=2).predict(queries)
    model = KNeighborsClassifier(index="hnsw", threads=2).fit(
        concurrent_collection.train().pixels, concurrent_collection.train().labels)
    model.predict(queries[:10])
    assert process_state() == before
    faiss.omp_set_num_threads(2)


def test_default_threads_follow_the_cpu_affinity(monkeypatch) -> None:
    import os

    from mnist_ann.runtime import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_threads() == 1
