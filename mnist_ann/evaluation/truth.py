"""Exact ground truth of the test queries, per ranking space, cached in the collection."""

from __future__ import annotations

import numpy as np

from mnist_ann.api import Collection
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


def _from_bytes(data: bytes) -> Neighbours:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    columns = []
    for name in ("rows", "distances"):
        column = table.column(name).combine_chunks()
        columns.append(column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1))
    return Neighbours(columns[0].astype(np.int64), columns[1])


def ground_truth(collection: Collection, index_name: str, k: int, threads: int | None = None,
                 log: Log = silent) -> Neighbours:
    """Exact neighbours of the test queries in the ranking space of index `index_name`,
    computed once and cached in the collection (checksummed like every other file)."""
    exact = collection.exact_searcher(index_name)
    filename = truth_file(exact.space.key, k)
    if filename in collection.manifest["files"]:
        return _from_bytes(collection.read_verified(filename))
    log(f"computing exact ground truth (k={k}) in the {exact.space.description} space; cached "
        f"as {filename}")
    with faiss_threads(threads):
        truth = exact.search(collection.test().pixels, k)
    import pyarrow.parquet as pq

    with atomic_path(collection.root / filename) as tmp:
        pq.write_table(_to_arrow(truth), tmp)
    collection.record_file(filename)
    collection.save()
    return Neighbours(truth.rows, truth.distances)
