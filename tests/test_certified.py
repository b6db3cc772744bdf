"""Certified-exact search by PCA lower-bound pruning: always the brute-force answer."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import clustered_digits, exact_knn, make_collection, run_cli

from mnist_ann.api import Collection
from mnist_ann.index import certified
from mnist_ann.index.build import build_indexes
from mnist_ann.index.certified import (
    FIRST_LISTS,
    CertifiedSearcher,
    LowerBounds,
    list_minima,
    nearest_in_best_lists,
)
from mnist_ann.index.integer_bounds import IntegerLayout
from mnist_ann.index.recipes import resolve_recipe
from mnist_ann.kernels import kernels


def collection_of(store: Path, images: np.ndarray, labels: np.ndarray | None = None,
                  test_size: float = 0.1) -> Collection:
    if labels is None:
        labels = np.arange(len(images)) % 10
    collection = make_collection(store, "c", images, labels.astype(np.uint8), test_size)
    build_indexes(collection, [resolve_recipe("exact-pca", len(collection.train()))],
                  threads=2)
    return Collection.open(store, "c")


def assert_exact(knn: CertifiedSearcher, train: np.ndarray, queries: np.ndarray, params: dict,
                 k: int = 7) -> dict:
    true_distances, true_rows = exact_knn(train, queries, k)
    found = knn.search(queries, k, params)
    np.testing.assert_array_equal(found.rows, true_rows)
    np.testing.assert_array_equal(found.distances, true_distances)
    return found.stats


def test_random_data_where_pca_captures_little(isolated: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2200, 784), dtype=np.uint8)  # no low-dimensional structure
    collection = collection_of(isolated / "store", images)
    knn = collection.searcher("exact-pca")
    train, test = collection.train().pixels, collection.test().pixels
    for components in (8, 32, 128):
        stats = assert_exact(knn, train, test, {"components": components})
        assert stats["components"] == components
    # nothing prunes here: every query ends comparing with every row
    assert stats["fallback_queries"] == len(test)
    # one query at a time (the point path) too
    for components in (8, 128):
        point = assert_exact(knn, train, test[:3], {"components": components})
        assert point["lists"] == 1


def test_structured_data_is_pruned_and_exact(isolated: Path) -> None:
    images, labels = clustered_digits(3000, seed=2)
    collection = collection_of(isolated / "store", images, labels)
    knn = collection.searcher("exact-pca")
    train, test = collection.train().pixels, collection.test().pixels
    stats = assert_exact(knn, train, test, {"components": 32, "candidates": 16}, k=5)
    assert stats["verified_median"] < len(train) / 10 and stats["fallback_queries"] == 0
    assert stats["lists"] > 1
    # a small batch searches one list of every row, and gets the same answers
    for start in range(0, 12, 4):
        small = assert_exact(knn, train, test[start:start + 4],
                             {"components": 32, "candidates": 16}, k=5)
        assert small["lists"] == 1


def test_first_candidates_are_the_nearest_by_bound_in_the_best_lists(isolated: Path) -> None:
    images, labels = clustered_digits(3000, seed=3)
    collection = collection_of(isolated / "store", images, labels)
    knn = collection.searcher("exact-pca")
    layout, queries = knn.layouts[True], collection.test().pixels
    projected = knn.bounds.project(queries, 32)
    extended = np.concatenate([projected, np.zeros((len(queries), 1), np.float32)], axis=1)
    minima = list_minima(layout, projected, map)
    query_of, row_of = nearest_in_best_lists(layout, minima, extended, 16, map)
    assert len(layout) > FIRST_LISTS
    assert np.array_equal(query_of, np.repeat(np.arange(len(queries)), 16))
    for q in range(len(queries)):
        lists = np.argsort(minima[:, q])[:FIRST_LISTS]
        members = np.concatenate([layout.members[j] for j in lists])
        bound = ((layout.projected[:, :32].astype(np.float64) - projected[q]) ** 2).sum(axis=1)
        found = row_of[query_of == q]
        assert np.isin(found, members).all() and len(set(found)) == 16
        np.testing.assert_allclose(np.sort(bound[found]), np.sort(bound[members])[:16],
                                   rtol=1e-5)


def test_equal_distances_follow_the_training_row(isolated: Path) -> None:
    rng = np.random.default_rng(4)
    base = rng.integers(60, 200, (40, 784), dtype=np.uint8)
    images = np.repeat(base, 30, axis=0)  # 30 identical copies of each image, far apart rows
    images = images[rng.permutation(len(images))]
    steps = images.copy()
    steps[:, 0] += 3  # and copies one step away: many rows at exactly equal distances
    collection = collection_of(isolated / "store", np.concatenate([images, steps]))
    knn = collection.searcher("exact-pca")
    train = collection.train().pixels
    queries = np.concatenate([base[:10], collection.test().pixels[:20]])
    for k in (7, 45):
        assert_exact(knn, train, queries, {"components": 16, "candidates": 8}, k)


def test_queries_that_force_the_fallback(isolated: Path) -> None:
    images, labels = clustered_digits(3000, seed=6)
    collection = collection_of(isolated / "store", images, labels)
    knn = collection.searcher("exact-pca")
    rng = np.random.default_rng(0)
    far = rng.integers(0, 256, (30, 784), dtype=np.uint8)  # unlike any training image
    # in one batch with ordinary queries, which are certified in earlier rounds
    queries = np.concatenate([collection.test().pixels[:100], far])
    stats = assert_exact(knn, collection.train().pixels, queries, {"components": 16,
                                                                    "candidates": 7})
    assert 0 < stats["fallback_queries"] < len(queries)
    assert stats["verified_max"] >= len(images) * 9 // 10


def test_noise_is_compared_with_every_row_and_memory_stays_bounded(isolated: Path,
                                                                   monkeypatch) -> None:
    """Random noise puts every row within every radius. Such queries go to the scan of every
    row, and what the range searches find is verified a bounded batch at a time, merged
    exactly: the same answers as brute force, in every block and on the point path."""
    images, labels = clustered_digits(3000, seed=6)
    collection = collection_of(isolated / "store", images, labels)
    knn = collection.searcher("exact-pca")
    train, test = collection.train().pixels, collection.test().pixels
    noise = np.random.default_rng(0).integers(0, 256, (80, 784), dtype=np.uint8)
    queries = np.concatenate([test[:150], noise])
    params = {"components": 32, "candidates": 16}
    stats = assert_exact(knn, train, queries, params)
    assert stats["verified_max"] == len(train)  # noise: every row, by the scan
    assert stats["whole_scan_queries"] == len(noise)
    assert stats["verified_median"] < len(train) / 10
    for one in noise[:2]:  # and one at a time
        point = assert_exact(knn, train, one[None], params)
        assert point["verified_max"] == len(train) and point["whole_scan_queries"] == 1

    # many queries with every list in play go to the scan before any of their rows is sought
    sought = []
    found_rows = certified.VerifiedPairs.__call__

    def seek(self, queries, counts, rows):
        sought.append(int(counts.sum()))
        return found_rows(self, queries, counts, rows)

    monkeypatch.setattr(certified.VerifiedPairs, "__call__", seek)
    assert assert_exact(knn, train, noise, params)["whole_scan_queries"] == len(noise)
    assert sum(sought) > 0  # fewer than SCAN_BATCH: each found hard by its rows
    monkeypatch.setattr(certified, "SCAN_BATCH", 10)
    sought.clear()
    assert assert_exact(knn, train, noise, params)["whole_scan_queries"] == len(noise)
    assert sum(sought) == 0

    batches = []
    verify_pairs = certified.verify_pairs

    def recorded(run, verify, n, query_of, row_of, k):
        batches.append(len(query_of))
        return verify_pairs(run, verify, n, query_of, row_of, k)

    monkeypatch.setattr(certified, "verify_pairs", recorded)
    # every query kept on the lists' path, its rows verified 300 or so at a time, each list
    # asked for at most 2,000 (query, row) pairs at once, blocks of 64 queries
    monkeypatch.setattr(certified, "HARD_SHARE", 2.0)
    monkeypatch.setattr(certified, "PAIR_BATCH", 300)
    monkeypatch.setattr(certified, "CALL_CELLS", 2000)
    monkeypatch.setattr(certified, "FIRST_CELLS", 64 * 3 * 16)
    stats = assert_exact(knn, train, queries, params)
    # noise now verified on the lists' path: its first candidates, then every row
    assert stats["verified_max"] == len(train) + 16 and stats["whole_scan_queries"] == 0
    # a batch is verified once it holds 300 pairs: at most 299 and one list's 2,000 more
    assert len(batches) > 20 and max(batches) <= 300 + 2000


def subspace_data(rng: np.random.Generator, n: int, rank: int) -> np.ndarray:
    """Integer images spanning at most `rank` directions: a PCA of that size loses nothing."""
    basis = rng.integers(0, 2, (rank, 784))
    weights = rng.integers(0, 4, (n, rank))
    return (weights @ basis * 3 + 20).clip(0, 255).astype(np.uint8)


def test_the_margin_holds_where_raw_float_bounds_overshoot(isolated: Path) -> None:
    """Without the margin, float32 rounding makes PCA 'lower bounds' exceed the true distance.

    On data that lies in a 24-dimensional subspace, the projection on 128 axes keeps every
    distance, so the float32 bound equals the true distance up to rounding, and rounding goes
    both ways: some computed bounds are above the truth. Certifying with those could skip a
    row at exactly the k-th distance with a smaller row number. With the margin, no row is
    ever left out at its own true distance: neither by `radius` (the list stage) nor by the
    range search with its per-query offsets.
    """
    rng = np.random.default_rng(7)
    images = subspace_data(rng, 1500, 24)
    collection = collection_of(isolated / "store", images)
    knn = collection.searcher("exact-pca")
    bounds: LowerBounds = knn.bounds
    train, queries = collection.train().pixels, collection.test().pixels
    projected = bounds.project(queries, 128)
    flat = faiss.IndexFlatL2(128)
    flat.add(np.ascontiguousarray(bounds.projected))
    computed, rows = flat.search(projected, len(train))
    t = train.astype(np.int64)
    true = ((queries.astype(np.int64)[:, None, :] - t[rows]) ** 2).sum(-1)
    assert (computed > true).any(), "no raw bound above the truth: the margin would be untested"
    norms = (queries.astype(np.int64) ** 2).sum(1)
    for j in range(0, len(train), 7):  # a row at exactly the k-th distance is never left out
        assert np.all(computed[:, j] < bounds.radius(true[:, j], norms, projected, 128))
    # the range search with the extra coordinate, each query's k-th distance being its 7th
    kth = np.sort(true, axis=1)[:, 6]
    radius, offsets = bounds.range_offsets(kth, norms, projected, 128)
    extended = faiss.IndexFlatL2(129)
    extended.add(np.hstack([bounds.projected, np.zeros((len(train), 1), np.float32)]))
    limits, _, found = extended.range_search(np.hstack([projected, offsets[:, None]]), radius)
    for query in range(len(queries)):
        within = np.flatnonzero(((t - queries[query].astype(np.int64)) ** 2).sum(1)
                                <= kth[query])
        assert set(within) <= set(found[limits[query]:limits[query + 1]])
    assert np.median(np.diff(limits)) < len(train) / 4  # and still tight enough to prune


@pytest.mark.parametrize("bounds", ["integer", "float32"])
def test_without_the_margin_ties_would_be_certified_wrongly(isolated: Path, monkeypatch,
                                                             bounds: str) -> None:
    """Many rows at exactly the k-th distance, found in float32 on either side of it.

    The margin covers the rounding of the projections themselves, which both forms of the
    batch steps start from: the integer bounds' quantization errors do not cover it."""
    rng = np.random.default_rng(11)
    centre = np.full(784, 100, np.int64)
    pixels = rng.choice(784, 90, replace=False)
    ring = np.repeat(centre[None], 90, axis=0)
    ring[np.arange(90), pixels] += 12  # 90 rows at squared distance 144 from the centre
    others = subspace_data(rng, 200, 20).astype(np.int64)  # PCA128 needs 128+ rows
    images = np.concatenate([ring, others]).astype(np.uint8)
    collection = make_collection(isolated / "store", "c", images,
                                 (np.arange(len(images)) % 10).astype(np.uint8), 0.02)
    train = collection.train().pixels
    build_indexes(collection, [resolve_recipe("exact-pca", len(train))], threads=2)
    knn = Collection.open(isolated / "store", "c").searcher("exact-pca")
    # the integer steps on whichever kernels this CPU runs (the portable ones run anywhere)
    knn.integer = (IntegerLayout(knn.bounds.projected, knn.layouts[True].members,
                                 kernels() or kernels("portable"))
                   if bounds == "integer" else None)
    query = centre[None].astype(np.uint8)
    params = {"components": 128, "candidates": 64}
    assert_exact(knn, train, query, params, k=7)
    # the 90 rows at the k-th distance would make it a query compared with every row instead
    monkeypatch.setattr(certified, "HARD_SHARE", 1.0)
    # no margin: a row counts as beyond the k-th distance once its float32 bound reaches it
    monkeypatch.setattr(LowerBounds, "_needed", lambda self, kth_distances, *rest: (
        np.zeros(kth_distances.shape), kth_distances.astype(np.float64)))
    # (a batch of 64, so the range search's BLAS distances |q|² + |x|² - 2q·x are the ones
    # rounded across 144; a single query's direct sums of squared differences round less)
    batch = np.repeat(query, 64, axis=0)
    found = knn.search(batch, 7, params)
    assert found.stats["bounds"].startswith(bounds)
    true_distances, true_rows = exact_knn(train, query, 7)
    assert np.all(true_distances == 144)
    # rows computed a hair above 144 are left out as "beyond the 7th distance": wrong rows
    assert not set(true_rows[0]) <= set(found.rows[0])


def test_cli_query_json_shows_what_was_verified(isolated: Path) -> None:
    images, labels = clustered_digits(2000, seed=3)
    collection_of(isolated / "store", images, labels)
    result = run_cli("query", "--collection", "c", "--index", "exact-pca", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["params"] == {"components": 128, "candidates": 16}
    certified = summary["certified"]
    assert certified["verified_median"] >= 16 and certified["fallback_queries"] >= 0
    assert 1 <= certified["lists_scanned_median"] <= certified["lists"]
    bad = run_cli("query", "--collection", "c", "--index", "exact-pca", "--param",
                  "components=129")
    assert bad.exit_code == 2 and "at most 128" in bad.stderr


def test_factory_pca_orders_components_by_variance() -> None:
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(3000, 784)) * np.linspace(5, 0.1, 784)).astype(np.float32)
    pca = faiss.PCAMatrix(784, 64)
    pca.train(data)
    eigenvalues = faiss.vector_to_array(pca.eigenvalues)[:64]
    assert np.all(np.diff(eigenvalues) <= 0)  # prefixes are the best projections
