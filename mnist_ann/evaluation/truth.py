"""Exact ground truth of the test queries, per ranking space, cached in the collection."""

from __future__ import annotations

import numpy as np

from mnist_ann.api import Collection
from mnist_ann.data.tables import numbers, read_arrow
from mnist_ann.fileio import atomic_path
from mnist_ann.index.neighbours import Neighbours
from mnist_ann.runtime import Log, faiss_threads, silent


def truth_file(space_key: str, k: int) -> str:
    return f"truth-k{k}.parquet" if space_key == "pixels" else f"truth-k{k}-{space_key}.parquet"


def _to_arrow(truth: Neighbours):  # -> pa.Table
    import pyarrow as pa

    k = truth.rows.shape[1]
    value_type = pa.int64() if truth.distances.dtype.kind == "i" else pa.float64()
    return pa.table({
        "rows": pa.FixedSizeListArray.from_arrays(pa.array(truth.rows.ravel(), pa.int64()), k),
        "distances": pa.FixedSizeListArray.from_arrays(
            pa.array(truth.distances.ravel(), value_type), k)})


def _from_bytes(data: bytes, what: str) -> Neighbours:
    table = read_arrow(data, what)
    columns = [numbers(table.column(name).combine_chunks().flatten()).reshape(len(table), -1)
               for name in ("rows", "distances")]
    return Neighbours(columns[0].astype(np.int64), columns[1].copy())


def ground_truth(collection: Collection, index_name: str, k: int, threads: int | None = None,
                 log: Log = silent, rows: np.ndarray | None = None) -> Neighbours:
    """Exact neighbours of the test queries in the ranking space of index `index_name`,
    computed once and cached in the collection (checksummed like every other file).

    With `rows`, of those test rows only: read from the cache when it exists, else computed
    for them alone (and not cached)."""
    exact = collection.exact_searcher(index_name)
    filename = truth_file(exact.space.key, k)
    if filename in collection.manifest["files"]:
        truth = _from_bytes(collection.read_verified(filename), filename)
        return truth if rows is None else truth.take(rows)
    if rows is not None:
        log(f"computing exact ground truth (k={k}) of {len(rows):,} sampled test queries in "
            f"the {exact.space.description} space")
        with faiss_threads(threads):
            found = exact.search(collection.test().pixels[rows], k)
        return Neighbours(found.rows, found.distances)
    log(f"computing exact ground truth (k={k}) in the {exact.space.description} space; cached "
        f"as {filename}")
    with faiss_threads(threads):
        truth = exact.search(collection.test().pixels, k)
    import pyarrow.parquet as pq

    with collection.writing(log) as change:
        if filename not in change.manifest["files"]:  # else another command cached it first
            with atomic_path(collection.root / filename) as tmp:
                pq.write_table(_to_arrow(truth), tmp)
            collection.record(change.manifest, filename)
    return Neighbours(truth.rows, truth.distances)


def _ranked_by_pool_distance(searcher, queries: np.ndarray, rows: np.ndarray,
                             k: int) -> Neighbours:
    scores = searcher.pool_distances(queries, rows)
    order = np.lexsort((rows, scores), axis=-1)[:, :k]
    return Neighbours(np.take_along_axis(rows, order, axis=1),
                      np.take_along_axis(scores, order, axis=1))


def rerank_pool_truth(searcher, queries: np.ndarray, k: int, pool: int,
                      threads: int | None = None) -> Neighbours:
    """A re-ranked searcher's exact answer on its candidate pool: the k of the candidate
    stage's `pool` nearest with the smallest re-rank distances (then training row), with no
    gate: what the re-rank would return if it re-ranked every query."""
    base = {key: value for key, value in searcher.parameters().items()
            if key not in searcher.tuning_grid}
    with faiss_threads(threads):
        found = searcher.base.search(queries, pool, {**base, "candidates": pool})
        return _ranked_by_pool_distance(searcher, queries, found.rows, k)


def rerank_whole_set_truth(searcher, queries: np.ndarray, k: int,
                           threads: int | None = None) -> Neighbours:
    """The exact k nearest by the re-rank distance over the whole training set (every
    training row compared with every query: seconds a query; for samples)."""
    every_row = np.broadcast_to(np.arange(searcher.ntotal), (len(queries), searcher.ntotal))
    with faiss_threads(threads):
        return _ranked_by_pool_distance(searcher, queries, np.ascontiguousarray(every_row), k)
