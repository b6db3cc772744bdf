"""The search stages on arrays in memory, each on its own: spaces, searchers, certified steps."""

from __future__ import annotations

from collections.abc import Mapping

import faiss
import numpy as np
import pytest
from helpers import clustered_digits, exact_knn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mnist_ann.classify import Classifier
from mnist_ann.index import certified, locality, searchers
from mnist_ann.index.build import build_in_memory
from mnist_ann.index.factory import make_searcher
from mnist_ann.index.layers import index_layers
from mnist_ann.index.locality import LOCALITY_BATCH, QueryOrder
from mnist_ann.index.neighbours import Neighbours, check_k, order_exactly
from mnist_ann.index.recipes import resolve_recipe
from mnist_ann.index.searchers import ExhaustiveSearcher, RerankSearcher
from mnist_ann.index.space import RankingSpace, vector_space


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = clustered_digits(3000, seed=21)
    return images[:2700], labels[:2700], images[2700:]


def searcher_for(recipe_name: str, train: np.ndarray):
    recipe = resolve_recipe(recipe_name, len(train), train.shape[1])
    space = vector_space(train)
    index = build_in_memory(recipe, space.float32, threads=2)
    return make_searcher(recipe, index, space)


@given(arrays(np.uint8, st.tuples(st.integers(1, 30), st.integers(1, 40))), st.data())
@settings(max_examples=40, deadline=None)
def test_space_distances_are_exact_integers(train: np.ndarray, data) -> None:
    queries = data.draw(arrays(np.uint8, st.tuples(st.integers(1, 5), st.just(train.shape[1]))))
    rows = data.draw(arrays(np.int64, (len(queries), 4), elements=st.integers(-1, len(train) - 1)))
    space = vector_space(train)
    found = space.distances(space.embed(queries), rows)
    t, q = train.astype(np.int64), queries.astype(np.int64)
    brute = ((q[:, None, :] - t[np.maximum(rows, 0)]) ** 2).sum(-1)
    np.testing.assert_array_equal(found[rows >= 0], brute[rows >= 0])
    np.testing.assert_array_equal(found, space.brute_force(space.embed(queries), rows))


def test_vector_spaces_choose_integers_only_when_exact() -> None:
    assert vector_space(np.array([[0, 255]], np.int64)).features.dtype == np.uint8
    assert vector_space(np.array([[-3, 9000]], np.int64)).features.dtype == np.int32
    assert vector_space(np.array([[0.5, 1.0]])).features.dtype == np.float64
    assert vector_space(np.array([[0, 2**20]])).features.dtype == np.float64  # too large
    integer = vector_space(np.array([[0, 255]], np.int64))
    with pytest.raises(ValueError, match="whole numbers"):
        integer.embed(np.array([[0.5, 2.0]]))
    assert integer.embed(np.array([[300.0, 2.0]])).dtype == np.int32


@pytest.mark.parametrize(("recipe", "kind"), [("flat", ExhaustiveSearcher),
                                              ("bytes=SQ8_direct", ExhaustiveSearcher),
                                              ("hnsw", RerankSearcher),
                                              ("exact-pca", certified.CertifiedSearcher)])
def test_searchers_on_arrays_in_memory(digits, recipe: str, kind: type) -> None:
    train, _, queries = digits
    searcher = searcher_for(recipe, train)
    assert isinstance(searcher, kind)
    found = searcher.search(queries, 9)
    true_distances, true_rows = exact_knn(train, queries, 9)
    if recipe == "hnsw":
        assert np.mean(found.distances <= true_distances[:, -1:]) >= 0.98
    else:
        np.testing.assert_array_equal(found.rows, true_rows)
        np.testing.assert_array_equal(found.distances, true_distances)


def test_order_exactly_breaks_ties_by_row_and_check_k() -> None:
    rows = np.array([[9, 3, 5, 1]])
    distances = np.array([[4, 4, 2, 4]])
    best = order_exactly(rows, distances, 3)
    assert best.rows.tolist() == [[5, 1, 3]] and best.distances.tolist() == [[2, 4, 4]]
    for bad in (0, 11, 2.5, True):
        with pytest.raises(ValueError, match="k must be between 1 and the training size 10"):
            check_k(bad, 10)


class NumpySearcher:
    """A searcher nothing else knows about: brute force in numpy."""

    name = "numpy"

    def __init__(self, space: RankingSpace) -> None:
        self.space = space

    @property
    def ntotal(self) -> int:
        return len(self.space)

    def parameters(self, overrides: Mapping | None = None) -> dict:
        return {}

    def search(self, queries: np.ndarray, k: int, params: Mapping | None = None) -> Neighbours:
        features = self.space.embed(queries)
        rows = np.broadcast_to(np.arange(self.ntotal), (len(features), self.ntotal))
        return order_exactly(rows, self.space.brute_force(features, np.ascontiguousarray(rows)),
                             k)


def test_a_new_searcher_needs_only_the_protocol(digits) -> None:
    train, labels, queries = digits
    queries = queries[:100]
    mine = Classifier(NumpySearcher(vector_space(train)), labels, k=7)
    flat = Classifier(searcher_for("flat", train), labels, k=7)
    np.testing.assert_array_equal(mine.predict(queries), flat.predict(queries))
    np.testing.assert_allclose(mine.predict_proba(queries), flat.predict_proba(queries))


# --- the certified search's steps, one at a time -------------------------------------------

@pytest.fixture(scope="module")
def certified_case(digits):
    train, _, queries = digits
    searcher = searcher_for("exact-pca", train)
    layout = searcher.layouts[True]
    projected = searcher.bounds.project(queries, 32)
    everything = searcher.bounds.projected[:, :32].astype(np.float64)
    true_distances, true_rows = exact_knn(train, queries, 7)
    return searcher, layout, queries, projected, everything, true_distances, true_rows


def test_step1_list_minima_are_each_lists_smallest_distance(certified_case) -> None:
    _, layout, _, projected, everything, *_ = certified_case
    minima = certified.list_minima(layout, projected, map)
    q = projected[:, :16].astype(np.float64)
    for j, rows in enumerate(layout.members[:20]):
        exact = ((q[:, None, :] - everything[rows, None, :16].transpose(1, 0, 2)) ** 2).sum(-1)
        scale = (q**2).sum(1) + (everything[rows, :16] ** 2).sum(1).max()
        assert np.all(np.abs(minima[j] - exact.min(axis=1)) <= 1e-5 * scale)


def test_step2_first_candidates_are_the_nearest_by_bound_in_the_best_lists(
        certified_case) -> None:
    searcher, layout, queries, projected, *_ = certified_case
    minima = certified.list_minima(layout, projected, map)
    extended = np.hstack([projected, np.zeros((len(projected), 1), np.float32)])
    query_of, row_of = certified.nearest_in_best_lists(layout, minima, extended, 16, map)
    assert np.all(np.bincount(query_of, minlength=len(queries)) == 16)
    list_of = np.empty(searcher.ntotal, np.int64)
    for j, rows in enumerate(layout.members):
        list_of[rows] = j
    best = np.argsort(minima, axis=0)[:certified.FIRST_LISTS]
    for query in range(0, len(queries), 17):
        mine = row_of[query_of == query]
        assert set(list_of[mine]) <= set(best[:, query])
        bounds = ((projected[query] - searcher.bounds.projected[mine, :32]) ** 2).sum(1)
        assert np.all(np.diff(bounds) >= -1e-3 * bounds.max())  # nearest first


def test_step3_lists_in_play_keep_every_true_neighbour(certified_case) -> None:
    searcher, layout, queries, projected, _, true_distances, true_rows = certified_case
    minima = certified.list_minima(layout, projected, map)
    norms = (queries.astype(np.int64) ** 2).sum(1)
    kth = true_distances[:, -1].astype(np.float64)
    needed = certified.lists_in_play(layout, searcher.bounds, minima, kth, norms, projected,
                                     map)
    list_of = np.empty(searcher.ntotal, np.int64)
    for j, rows in enumerate(layout.members):
        list_of[rows] = j
    assert all(needed[list_of[true_rows[i]], i].all() for i in range(len(queries)))
    assert needed.sum(axis=0).mean() < len(layout) / 2  # and it does leave lists out


def test_step4_rows_within_the_radius_include_every_true_neighbour(certified_case) -> None:
    searcher, layout, queries, _, _, true_distances, _ = certified_case
    projected = searcher.bounds.project(queries, 64)
    norms = (queries.astype(np.int64) ** 2).sum(1)
    kth = true_distances[:, -1].astype(np.float64)
    radius, offsets = searcher.bounds.range_offsets(kth, norms, projected, 64)
    extended = np.hstack([projected, offsets[:, None]])
    needed = np.ones((len(layout), len(queries)), bool)
    parts = []
    certified.rows_within(layout, needed, extended, radius, map,
                          lambda asked, counts, rows: parts.append((np.repeat(asked, counts),
                                                                    rows)))
    query_of, row_of = (np.concatenate(part) for part in zip(*parts, strict=True))
    t = searcher.space.features.astype(np.int64)
    for query in range(len(queries)):
        within = np.flatnonzero(((t - queries[query].astype(np.int64)) ** 2).sum(1)
                                <= kth[query])
        assert set(within) <= set(row_of[query_of == query])


def test_step5_verify_pairs_keeps_the_k_exactly_nearest(certified_case) -> None:
    searcher, _, queries, *_ = certified_case
    rng = np.random.default_rng(3)
    pairs = np.unique(rng.integers(0, len(queries) * searcher.ntotal, 5000))  # no repeats
    query_of, row_of = pairs // searcher.ntotal, pairs % searcher.ntotal
    rows, distances, counts = certified.verify_pairs(map, searcher._verify(queries),
                                                     len(queries), query_of, row_of, 3)
    np.testing.assert_array_equal(counts, np.bincount(query_of, minlength=len(queries)))
    t, q = searcher.space.features.astype(np.int64), queries.astype(np.int64)
    for query in range(0, len(queries), 13):
        mine = np.unique(row_of[query_of == query])
        exact = ((t[mine] - q[query]) ** 2).sum(1)
        order = np.lexsort((mine, exact))[:3]
        got = rows[query][rows[query] >= 0]
        np.testing.assert_array_equal(got, mine[order][:len(got)])
        np.testing.assert_array_equal(distances[query][:len(got)], exact[order][:len(got)])


def test_certified_search_needs_integer_data(digits) -> None:
    train, _, _ = digits
    recipe = resolve_recipe("exact-pca", len(train))
    space = vector_space(train.astype(np.float64) + 0.5)
    index = build_in_memory(recipe, space.float32)
    with pytest.raises(ValueError, match="must be integers"):
        make_searcher(recipe, index, space)


@pytest.mark.parametrize("factory", ["IVF8,Flat", "HNSW16", "SQ8_direct"])
def test_indexes_said_to_return_direct_distances_do(factory: str) -> None:
    """IVF,Flat, HNSW over flat storage and SQ8_direct return sums of squared differences: exact for
    integers below 2²⁴, which the re-rank then takes as they are (returns_direct_distances)."""
    from mnist_ann.index.layers import returns_direct_distances

    rng = np.random.default_rng(4)
    train = (rng.random((2000, 784)) < 0.5).astype(np.uint8) * 255  # distances near 2.5e7
    train[:1000] //= 8  # and some far below 2²⁴
    queries = np.concatenate([train[:25], train[1000:1025]]) ^ (rng.random((50, 784)) < 0.05
                                                                ).astype(np.uint8)
    index = build_in_memory(resolve_recipe(f"x={factory}", len(train)), train.astype(np.float32))
    assert returns_direct_distances(index)
    params = {"nprobe": 8} if "IVF" in factory else {"efSearch": 64}
    from mnist_ann.index.params import make_search_parameters

    sums, rows = index.search(queries.astype(np.float32), 20,
                              params=make_search_parameters(index, params))
    exact = ((train[rows].astype(np.int64) - queries[:, None, :].astype(np.int64)) ** 2).sum(-1)
    below = exact < 2**24
    assert below.any() and (~below).any()
    np.testing.assert_array_equal(sums[below], exact[below])
    assert not returns_direct_distances(build_in_memory(resolve_recipe("flat", 2000),
                                                        train.astype(np.float32)))


def test_sq8_direct_ranks_pixels_exactly_without_a_float32_copy(digits) -> None:
    """SQ8_direct stores each pixel as its byte: searched like flat, certified exact, in a
    quarter of the memory, since its own sums stand in for the re-rank's float32 copy."""
    train, _, queries = digits
    recipe = resolve_recipe("bytes=SQ8_direct", len(train))
    space = vector_space(train)
    searcher = make_searcher(recipe, build_in_memory(recipe, train.astype(np.float32)), space)
    found = searcher.search(queries, 7)
    true_distances, true_rows = exact_knn(train, queries, 7)
    np.testing.assert_array_equal(found.rows, true_rows)
    np.testing.assert_array_equal(found.distances, true_distances)
    assert searcher.space._float32 is None  # never made


def test_sq8_direct_over_more_than_bytes_is_only_a_candidate_stage() -> None:
    """Values beyond 0..255 do not fit its bytes: its distances are then not the space's, and
    it is searched as approximate candidates re-ranked exactly."""
    rng = np.random.default_rng(8)
    train = rng.integers(0, 1000, (500, 16))
    searcher = searcher_for("bytes=SQ8_direct", train)
    assert isinstance(searcher, RerankSearcher) and not searcher.direct
    found = searcher.search(train[:20], 3)
    exact = ((train[found.rows] - train[:20, None, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(found.distances, exact)  # re-ranked in integers


# --- the locality order of a large batch -----------------------------------------------------

@pytest.mark.parametrize("recipe", ["hnsw", "ivf", "pca-hnsw"])
def test_a_large_batch_searched_in_locality_order_answers_in_the_order_asked(
        digits, recipe: str) -> None:
    train, _, queries = digits
    assert len(queries) >= LOCALITY_BATCH
    searcher = searcher_for(recipe, train)
    assert searcher.query_order is not None
    found = searcher.search(queries, 7)
    one_by_one = [searcher.search(queries[i:i + 1], 7) for i in range(len(queries))]
    np.testing.assert_array_equal(found.rows, np.concatenate([n.rows for n in one_by_one]))
    np.testing.assert_array_equal(found.distances,
                                  np.concatenate([n.distances for n in one_by_one]))
    true_distances, _ = exact_knn(train, queries, 7)
    assert np.mean(found.distances <= true_distances[:, -1:]) >= 0.95


def test_query_order_groups_a_batch_by_nearest_landmark(digits, monkeypatch) -> None:
    train, _, queries = digits
    query_order = searcher_for("hnsw", train).query_order
    order = query_order.order(queries.astype(np.float32))
    monkeypatch.setattr(locality, "ORDER_CHUNK", 128)  # landmarks found chunk by chunk
    np.testing.assert_array_equal(query_order.order(queries.astype(np.float32)), order)
    assert sorted(order.tolist()) == list(range(len(queries)))
    _, nearest = query_order.landmarks.search(queries.astype(np.float32), 1)
    assert np.all(np.diff(nearest[order, 0]) >= 0)
    assert len(np.unique(nearest)) > 1  # the order is not the identity by accident
    assert not np.array_equal(order, np.arange(len(queries)))
    assert query_order.order(queries[:LOCALITY_BATCH - 1].astype(np.float32)) is None


@pytest.mark.parametrize("recipe", ["flat", "bytes=SQ8_direct"])
def test_exhaustive_indexes_keep_the_order_asked(digits, recipe: str) -> None:
    train, _, _ = digits
    assert QueryOrder.of_index(searcher_for(recipe, train).index) is None


@given(arrays(np.float32, st.integers(1, 3000),
              elements=st.floats(0, 100, width=32) | st.sampled_from([1.0, 2.0])),
       st.integers(1, 400))
@settings(max_examples=60, deadline=None)
def test_nearest_rows_are_the_smallest_values(values: np.ndarray, count: int) -> None:
    chosen = certified.nearest_rows(values, count)
    assert len(np.unique(chosen)) == len(chosen) == min(count, len(values))
    if count < len(values):
        assert values[chosen].max() <= np.partition(values, count - 1)[count - 1]


def test_distances_to_all_rows_add_the_chunks_of_axes(digits) -> None:
    train, _, queries = digits
    vectors = train[:, :20].astype(np.float32)
    chunks = [np.ascontiguousarray(vectors[:, a:b])
              for a, b in certified.axis_chunks(0, vectors.shape[1])]
    assert [c.shape[1] for c in chunks] == [8, 8, 4]
    query = queries[0, :20].astype(np.float32)
    expected = ((vectors.astype(np.float64) - query) ** 2).sum(1)
    np.testing.assert_allclose(certified._distances_to_all(query, chunks), expected, rtol=1e-6)


def test_an_index_that_cannot_give_its_vectors_back_keeps_the_order(digits,
                                                                     monkeypatch) -> None:
    train, _, _ = digits
    layers = index_layers(searcher_for("hnsw", train).index)

    class Opaque:
        def reconstruct(self, node: int) -> np.ndarray:
            raise RuntimeError("reconstruct not implemented for this type of index")

    monkeypatch.setattr(locality, "index_layers", lambda index: layers)
    monkeypatch.setattr(locality.faiss, "downcast_index", lambda index: Opaque())
    assert QueryOrder.of_index(layers[0]) is None


def test_a_rerank_of_many_candidates_goes_a_block_of_queries_at_a_time(digits,
                                                                        monkeypatch) -> None:
    train, _, queries = digits
    searcher = searcher_for("pca-ivf", train)
    assert isinstance(searcher, RerankSearcher)
    # every list, and every row re-ranked: the exact answer
    params = {"nprobe": faiss.extract_index_ivf(searcher.index).nlist, "candidates": len(train)}
    whole = searcher.search(queries, 7, params)
    true_distances, true_rows = exact_knn(train, queries, 7)
    np.testing.assert_array_equal(whole.rows, true_rows)
    monkeypatch.setattr(searchers, "RERANK_CELLS", 5 * len(train))  # 5 queries a block
    blocked = searcher.search(queries, 7, params)
    np.testing.assert_array_equal(blocked.rows, true_rows)
    np.testing.assert_array_equal(blocked.distances, true_distances)
