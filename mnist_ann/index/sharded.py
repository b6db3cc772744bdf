"""Sharded search: searchers over contiguous ranges of the training rows, merged exactly.

Each shard returns its own exact top k (rows local to the shard); the merge offsets them to
global training rows and orders the union by (exact distance, global row), so the result is
the unsharded search's, ties included. (FAISS's `merge_knn_results` breaks ties by shard
order and works on float32 distances; exact integer distances need neither.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mnist_ann.errors import InvalidArgument
from mnist_ann.index.neighbours import Neighbours, check_k, order_exactly


def shard_ranges(n_rows: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous ranges covering rows 0..n_rows, as equal as can be."""
    if not 1 <= shards <= n_rows:
        raise InvalidArgument(f"--shards must be between 1 and the {n_rows:,} training rows, "
                              f"not {shards}")
    bounds = np.linspace(0, n_rows, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def merge_shards(parts: Sequence[Neighbours], offsets: Sequence[int], k: int) -> Neighbours:
    """The k best of every shard's exact neighbours, by (distance, global row)."""
    if len(parts) != len(offsets) or not parts:
        raise ValueError("one offset per shard's result")
    rows = np.concatenate([np.where(part.rows >= 0, part.rows + offset, -1)
                           for part, offset in zip(parts, offsets, strict=True)], axis=1)
    distances = np.concatenate([part.distances for part in parts], axis=1)
    merged = order_exactly(rows, distances, k)
    if merged.rows.shape[1] < k:  # fewer rows in all shards than k: cannot happen by check_k
        raise ValueError(f"the shards hold fewer than {k} rows")
    return merged


class ShardedSearcher:
    """One searcher over shards that each hold a contiguous range of the training rows.

    `search_shards(queries, k, params)` returns each shard's Neighbours (local rows); by
    default the shards are searched here, one after the other, but a cluster can do it
    instead (distributed.py). The merge is exact either way.
    """

    stats_name = "shards"

    def __init__(self, shards: Sequence, ranges: Sequence[tuple[int, int]], name: str,
                 space=None,
                 search_shards: Callable[..., list[Neighbours]] | None = None) -> None:
        if len(shards) != len(ranges) or not shards:
            raise ValueError("one range per shard")
        if ranges[0][0] != 0 or any(end != start for (_, end), (start, _)
                                    in itertools.pairwise(ranges)):
            raise ValueError(f"shard ranges {ranges} are not contiguous from row 0")
        self.shards, self.ranges, self.name = list(shards), list(ranges), name
        self.space = space if space is not None else self.shards[0].space
        self._search_shards = search_shards

    def __repr__(self) -> str:
        return f"ShardedSearcher({self.name!r}, {len(self.shards)} shards)"

    @property
    def ntotal(self) -> int:
        return self.ranges[-1][1]

    def parameters(self, overrides: Mapping | None = None) -> dict:
        return self.shards[0].parameters(overrides)

    def with_defaults(self, defaults: Mapping) -> ShardedSearcher:
        return ShardedSearcher([shard.with_defaults(defaults) for shard in self.shards],
                               self.ranges, self.name, self.space, self._search_shards)

    def search_each(self, queries: np.ndarray, k: int,
                    params: Mapping | None = None) -> list[Neighbours]:
        if self._search_shards is not None:
            return self._search_shards(queries, k, params)
        return [shard.search(queries, min(k, shard.ntotal), params) for shard in self.shards]

    def search(self, queries: np.ndarray, k: int,
               params: Mapping | None = None) -> Neighbours:
        k = check_k(k, self.ntotal)
        self.parameters(params)  # checked once, before any shard is asked
        parts = self.search_each(queries, k, params)
        merged = merge_shards(parts, [start for start, _ in self.ranges], k)
        return Neighbours(merged.rows, merged.distances, {"shards": len(self.shards)})
