"""The compiled integer kernels and the certified search on them: every instruction set gives
numpy's integers, and the search gives brute force's answers, with or without the kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import clustered_digits
from test_certified import assert_exact, collection_of, subspace_data

from mnist_ann import kernels as kernels_module
from mnist_ann.index import certified
from mnist_ann.index import space as space_module
from mnist_ann.index.integer_bounds import IntegerLayout, QuantizedQueries
from mnist_ann.index.space import vector_space
from mnist_ann.kernels import INSTRUCTION_SETS, kernels

# the portable kernels run wherever the extension is built; the VNNI ones where the CPU can
AVAILABLE = [name for name in INSTRUCTION_SETS if kernels(name) is not None]


def test_the_extension_is_built() -> None:
    """`make test` installs with a C compiler: the kernels must be there (else every test
    below would silently test nothing but the fallback). By default only VNNI's are used."""
    assert "portable" in AVAILABLE
    assert kernels() == (kernels("vnni") if "vnni" in AVAILABLE else None)


@pytest.mark.parametrize("name", AVAILABLE)
def test_pixel_distances_are_numpys_integers(name: str, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    for dimension in (784, 50, 33, 32, 1):  # whole and partial 32-pixel steps
        train = rng.integers(0, 256, (300, dimension), dtype=np.uint8)
        queries = rng.integers(0, 256, (20, dimension), dtype=np.uint8)
        rows = rng.integers(-1, 300, (20, 37))
        monkeypatch.setattr(space_module, "kernels", lambda name=name: kernels(name))
        found = space_module._compiled_distances(train, queries, rows)
        space = vector_space(train)
        np.testing.assert_array_equal(found, space.brute_force(queries, rows))
        assert (found[rows < 0] == space.missing).all()
    with pytest.raises(ValueError, match="rows up to 300 for queries"):
        space_module._compiled_distances(train, queries, np.full((20, 2), 300))
    wider = np.zeros((20, train.shape[1] + 1), np.uint8)  # a shape the kernel would overrun
    with pytest.raises(ValueError, match=r"for queries \(20, 2\)"):
        space_module._compiled_distances(train, wider, np.zeros((20, 2), np.int64))


def integer_case(name: str, dimension: int = 64, seed: int = 5):
    """A layout over random projected rows in uneven lists, and quantized queries."""
    rng = np.random.default_rng(seed)
    projected = (rng.normal(0, 1, (700, dimension)) * np.linspace(900, 40, dimension)).astype(
        np.float32)
    order = rng.permutation(len(projected))
    members = np.split(order, [5, 90, 91, 400])  # sizes 5, 85, 1, 309, 300: padding everywhere
    layout = IntegerLayout(projected, members, kernels(name))
    queries = (rng.normal(0, 1, (45, dimension)) * np.linspace(1100, 50, dimension)).astype(
        np.float32)
    return layout, projected, members, queries, layout.quantize(queries)


def integer_distances(layout: IntegerLayout, projected: np.ndarray, queries: np.ndarray,
                      axes: int) -> np.ndarray:
    """numpy's |q - x|² [n, rows] on the first `axes` axes, quantized as the layout does."""
    def quantize(values: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(values[:, :axes].astype(np.float64) / layout.scale),
                       -layout.largest, layout.largest).astype(np.int64)
    q, x = quantize(queries), quantize(projected)
    return ((q[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)


@pytest.mark.parametrize("name", AVAILABLE)
def test_list_minima_and_nearest_are_numpys(name: str) -> None:
    layout, projected, members, queries, quantized = integer_case(name)
    minima = layout.list_minima(quantized, map, parts=3)
    on_32 = integer_distances(layout, projected, queries, 32)
    for j, rows in enumerate(members):
        np.testing.assert_array_equal(minima[j], on_32[:, rows].min(axis=1))
    best = np.argsort(minima, axis=0)[:2].T
    on_all = integer_distances(layout, projected, queries, 64)
    for width in (7, 40):
        found = layout.nearest(quantized, best, width, 64, map, parts=2)
        for i in range(len(queries)):
            pool = np.concatenate([members[j] for j in best[i]])
            expected = np.sort(on_all[i, pool])[:width]
            kept = found[i][found[i] >= 0]
            assert len(kept) == min(width, len(pool)) and np.isin(kept, pool).all()
            np.testing.assert_array_equal(np.sort(on_all[i, kept]), expected)
    for width, axes, lists in ((257, 64, best), (7, 24, best), (7, 64, best + 5)):
        with pytest.raises(ValueError):  # never past the kernel's buffers
            layout.nearest(quantized, lists, width, axes, map, parts=1)


@pytest.mark.parametrize("name", AVAILABLE)
def test_the_cascade_keeps_exactly_the_rows_within_every_stop(name: str) -> None:
    layout, projected, members, queries, quantized = integer_case(name)
    stops = [16, 32, 64]
    distances = {m: integer_distances(layout, projected, queries, m) for m in stops}
    rng = np.random.default_rng(9)
    # thresholds around the 20th-smallest distance at each stop (some rows in, most out), and
    # for every other query exactly a row's distance: a row at its threshold stays
    scales = np.where(np.arange(len(queries))[:, None] % 2, 1.0,
                      rng.uniform(0.7, 1.3, (len(queries), len(stops))))
    thresholds = np.stack([np.sort(distances[m], axis=1)[:, 20] for m in stops], axis=1)
    thresholds = (thresholds * scales).astype(np.int64)
    limits = layout.limits(thresholds, quantized, stops)
    for j, rows in enumerate(members):
        asked = np.arange(0, len(queries), 3)
        query_of, found = layout.within(j, quantized, asked, limits, stops)
        assert np.all(np.diff(query_of) >= 0)  # grouped by query, in order
        inside = np.ones((len(queries), len(rows)), bool)
        for s, m in enumerate(stops):
            inside &= distances[m][:, rows] <= thresholds[:, s:s + 1]
        expected = {(q, r) for q in asked for r in rows[inside[q]]}
        assert set(zip(query_of.tolist(), found.tolist(), strict=True)) == expected
        assert len(found) == len(expected)


def test_no_row_at_its_own_distance_is_ever_left_out() -> None:
    """The quantization errors are what keep the integer bound below the truth.

    On data in a 24-dimensional subspace every distance survives the projection, so a row's
    exact projected distance is as tight as a bound can be. Given exactly that distance, the
    row must stay within the threshold at every stop; without the error terms many would not.
    """
    rng = np.random.default_rng(7)
    train = subspace_data(rng, 600, 24).astype(np.float64)
    centred = train - train.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    projected = (centred @ axes[:64].T).astype(np.float32)
    queries = (subspace_data(rng, 30, 24) - train.mean(axis=0)) @ axes[:64].T
    queries = queries.astype(np.float32)
    layout = IntegerLayout(projected, [np.arange(len(projected))], kernels())
    quantized = layout.quantize(queries)
    stops = [16, 32, 64]
    exact = {m: ((queries[:, None, :m].astype(np.float64)
                  - projected[None, :, :m].astype(np.float64)) ** 2).sum(axis=2) for m in stops}
    no_errors = QuantizedQueries(quantized.doubled, quantized.squared_norms,
                                 np.zeros_like(quantized.errors))
    lost_without_errors = 0
    for row in range(0, len(projected), 5):
        needed = np.stack([exact[m][:, row] for m in stops], axis=1)
        limits = layout.limits(layout.thresholds(needed, quantized, stops), quantized, stops)
        query_of, found = layout.within(0, quantized, np.arange(len(queries)), limits, stops)
        assert set(range(len(queries))) <= set(query_of[found == row].tolist())
        saved, layout.row_errors = layout.row_errors, np.zeros_like(layout.row_errors)
        bare = layout.limits(layout.thresholds(needed, no_errors, stops), no_errors, stops)
        layout.row_errors = saved
        query_of, found = layout.within(0, quantized, np.arange(len(queries)), bare, stops)
        lost_without_errors += len(queries) - int((found == row).sum())
    assert lost_without_errors > 0, "no row lost without the errors: the test proves nothing"


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integer")


@pytest.mark.parametrize("name", [*AVAILABLE, "faiss"])
def test_the_certified_search_is_exact_on_every_path(digits_store: Path, name: str,
                                                     monkeypatch) -> None:
    """The batch search on the integer kernels (each instruction set) and on FAISS, with
    digits, noise (compared with every row) and a small CALL_CELLS (lists asked in parts)."""
    images, labels = clustered_digits(3000, seed=8)
    collection = collection_of(digits_store / name, images, labels)
    knn = collection.searcher("exact-pca")
    if name == "faiss":
        knn.integer = None
    else:
        knn.integer = IntegerLayout(knn.bounds.projected, knn.layouts[True].members,
                                    kernels(name))
    train, test = collection.train().pixels, collection.test().pixels
    noise = np.random.default_rng(1).integers(0, 256, (40, 784), dtype=np.uint8)
    queries = np.concatenate([test[:200], noise])
    for components in (32, 64, 128):
        stats = assert_exact(knn, train, queries, {"components": components, "candidates": 16})
        assert stats["whole_scan_queries"] == len(noise)
        assert stats["verified_median"] < len(train) / 10
    monkeypatch.setattr(certified, "CALL_CELLS", 500)
    monkeypatch.setattr(certified, "HARD_SHARE", 2.0)  # noise's rows found list by list
    stats = assert_exact(knn, train, queries, {"components": 64, "candidates": 16}, k=9)
    assert stats["verified_max"] >= len(train) and stats["whole_scan_queries"] == 0


def test_without_the_extension_everything_runs_on_faiss(digits_store: Path,
                                                        monkeypatch) -> None:
    images, labels = clustered_digits(2000, seed=9)
    collection = collection_of(digits_store / "none", images, labels)
    monkeypatch.setattr(kernels_module, "kernels", lambda instruction_set=None: None)
    monkeypatch.setattr(space_module, "kernels", lambda instruction_set=None: None)
    knn = collection.searcher("exact-pca")
    assert knn.integer is None
    train, test = collection.train().pixels, collection.test().pixels
    assert_exact(knn, train, test, {"components": 64, "candidates": 16})
