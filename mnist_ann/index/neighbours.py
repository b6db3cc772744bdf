"""The result of every search: each query's k nearest training rows, exactly ordered."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mnist_ann.errors import InvalidArgument

MISSING = np.iinfo(np.int64).max  # the distance of a missing neighbour in integer spaces


@dataclass(frozen=True)
class Neighbours:
    """The k nearest training rows of each query, ordered by (exact distance, row).

    rows: int64 [n, k] positions in the training set (-1 where the index found fewer);
    distances: [n, k] squared L2 distances in the ranking space: exact int64 in integer spaces
    (MISSING where rows is -1), float64 in float spaces (inf where rows is -1).
    """

    rows: np.ndarray
    distances: np.ndarray
    stats: dict = field(default_factory=dict)
    # a searcher that ranked a larger candidate pool may keep it (ordered the same way):
    # evidence beyond the k neighbours, from which the vote's confidence is drawn
    pool: Neighbours | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> Neighbours:
        """The neighbours of the queries at `positions` (an index array or a slice), in that
        order (the pool likewise)."""
        return Neighbours(self.rows[positions], self.distances[positions], self.stats,
                          None if self.pool is None else self.pool.take(positions))


def order_exactly(rows: np.ndarray, distances: np.ndarray, k: int) -> Neighbours:
    """The k best candidates of each query by (distance, training row)."""
    order = np.lexsort((rows, distances), axis=1)[:, :k]
    return Neighbours(np.take_along_axis(rows, order, 1), np.take_along_axis(distances, order, 1))


def check_k(k: int, ntotal: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= ntotal:
        raise InvalidArgument(f"k must be between 1 and the training size {ntotal}, not {k}")
    return int(k)
