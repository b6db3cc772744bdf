"""Searchers: one protocol, `search(queries, k, params) -> Neighbours`, many kinds.

Every searcher returns each query's k nearest training rows ordered by (exact distance in its
ranking space, row). They differ in how they find the candidates:

- `RerankSearcher`: an approximate FAISS index returns `candidates` rows (k+8 by default),
  re-ranked exactly;
- `ExhaustiveSearcher`: a flat index compares with every row in float32; queries whose
  float32 margin could hide a neighbour are searched again with more candidates, so the
  answer is exact;
- `CertifiedSearcher` (certified.py): PCA lower bounds prune, exact distances verify.

A large batch is searched in `locality.QueryOrder` (near queries one after another, for the
CPU caches), its results given back in the order asked.

Searchers hold no per-call state: one searcher may be shared by many threads. FAISS search
parameters go to FAISS per call (params.py), never set on the shared index.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import ClassVar, Protocol

import faiss
import numpy as np

from mnist_ann.errors import IntegrityError
from mnist_ann.index.layers import (
    flat_vectors,
    returns_direct_distances,
    stores_bytes,
    transforms_of,
)
from mnist_ann.index.locality import QueryOrder
from mnist_ann.index.neighbours import Neighbours, check_k, order_exactly
from mnist_ann.index.params import check_search_parameters, make_search_parameters
from mnist_ann.index.recipes import CANDIDATES, Recipe
from mnist_ann.index.space import RankingSpace, squared_norms

RERANK_EXTRA = 8
# at most this many candidates (query, row) are re-ranked at once: `candidates` may be as
# large as the training set, and a batch times that would not fit in memory
RERANK_CELLS = 1 << 22
# FAISS computes |q|² + |x|² - 2 q·x in float32; over d terms its error stays below about
# d · 2⁻²⁴ · (|q|² + |x|²); for 784 pixels that is 4.7e-5 · (|q|² + |x|²). Four times that is
# the margin, and it grows with d beyond 784.
FLOAT32_RELATIVE_MARGIN = 2e-4
MARGIN_DIMENSION = 784


def float32_margin(dimension: int) -> float:
    """The relative error margin of FAISS's float32 distances over `dimension` terms."""
    return FLOAT32_RELATIVE_MARGIN * max(1.0, dimension / MARGIN_DIMENSION)


class Searcher(Protocol):
    """Finds each query's k nearest training rows, exactly ranked in `space`."""

    name: str
    space: RankingSpace

    @property
    def ntotal(self) -> int: ...

    def parameters(self, overrides: Mapping | None = None) -> dict: ...

    def search(self, queries: np.ndarray, k: int,
               params: Mapping | None = None) -> Neighbours: ...


class FaissSearcher:
    """What every FAISS-backed searcher shares: checked parameters and the space."""

    extra_parameters: ClassVar[dict[str, tuple[type, float, str]]] = {}

    def __init__(self, index: faiss.Index, space: RankingSpace,
                 defaults: Mapping | None = None, name: str = "index",
                 owner: faiss.Index | None = None) -> None:
        if index.d != space.dimension or index.ntotal != len(space):
            raise IntegrityError(f"index {name!r} holds {index.ntotal:,} vectors of {index.d} "
                                 f"but its space has {len(space):,} of {space.dimension}; "
                                 "rebuild it with `mnist-ann build --force`")
        self.index = index
        # FAISS frees an inner index with the index that wraps it: keep the wrapper alive
        self.owner = owner if owner is not None else index
        self.space = space
        self.name = name
        self.defaults = dict(defaults or {})
        self._prepared: dict[tuple, tuple[dict, faiss.SearchParameters | None]] = {}
        stored = flat_vectors(index)
        if stored is not None and space.integer:
            space.adopt_float32(stored, self.owner)  # no second float32 copy of the pixels
        self.query_order = QueryOrder.of_index(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, space={self.space.description!r})"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _prepare(self, overrides: Mapping | None) -> tuple[dict, faiss.SearchParameters | None]:
        """Checked parameters and their FAISS objects, made once per distinct setting."""
        key = tuple(sorted((overrides or {}).items()))
        prepared = self._prepared.get(key)
        if prepared is None:
            merged = {**self.defaults, **(overrides or {})}
            checked = check_search_parameters(self.index, merged, f"index {self.name!r}",
                                              self.extra_parameters)
            prepared = self._complete(checked), make_search_parameters(self.index, checked)
            self._prepared[key] = prepared  # whole, in one step: safe to share
        return prepared

    def _complete(self, checked: dict) -> dict:
        return checked

    def with_defaults(self, defaults: Mapping) -> FaissSearcher:
        """The same searcher (index, space, structures shared) with other default settings."""
        other = copy.copy(self)
        other.defaults, other._prepared = dict(defaults), {}
        return other

    def parameters(self, overrides: Mapping | None = None) -> dict:
        """The default search parameters with `overrides` applied, checked against the
        index."""
        return dict(self._prepare(overrides)[0])

    def search(self, queries: np.ndarray, k: int,
               params: Mapping | None = None) -> Neighbours:
        """The k nearest training rows of each query, exactly ranked in the space."""
        checked, faiss_params = self._prepare(params)
        k = check_k(k, self.ntotal)
        features = self.space.embed(queries)
        order = self.query_order.order(features) if self.query_order else None
        if order is None:
            return self._search(features, k, checked, faiss_params)
        found = self._search(features[order], k, checked, faiss_params)
        return found.take(np.argsort(order))

    def _search(self, features: np.ndarray, k: int, checked: dict,
                faiss_params: faiss.SearchParameters | None) -> Neighbours:
        raise NotImplementedError

    def _candidates(self, features: np.ndarray, width: int,
                    faiss_params: faiss.SearchParameters | None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(features, dtype=np.float32)
        return self.index.search(queries, width, params=faiss_params)



def direct_distances(index: faiss.Index, space: RankingSpace) -> bool:
    """Whether the index's distances are the space's own sums of squared differences (an
    SQ8_direct index's only where the space's features are bytes)."""
    return returns_direct_distances(index) and (not stores_bytes(index)
                                                or space.dtype == np.uint8)


class RerankSearcher(FaissSearcher):
    """An approximate index's candidates (k+8, or `candidates`), re-ranked exactly.

    When the index computes its distances directly on the vectors of the space (IVF,Flat,
    HNSW over flat storage), those are the re-rank's sums already: only integer sums at or
    above 2²⁴ are recomputed, and no float32 copy of the training set is needed.
    """

    def __init__(self, index: faiss.Index, space: RankingSpace,
                 defaults: Mapping | None = None, name: str = "index",
                 owner: faiss.Index | None = None) -> None:
        super().__init__(index, space, defaults, name, owner)
        self.direct = direct_distances(index, space)
        if space.integer and not self.direct:
            _ = space.float32  # the re-rank's sums need it: made on load, not first search

    def _search(self, features: np.ndarray, k: int, checked: dict,
                faiss_params: faiss.SearchParameters | None) -> Neighbours:
        asked = checked.get(CANDIDATES)
        width = min(max(k, asked) if asked else k + RERANK_EXTRA, self.ntotal)
        block = max(1, RERANK_CELLS // width)  # a batch of real size is one block
        parts = []
        for start in range(0, len(features), block):
            queries = features[start:start + block]
            sums, rows = self._candidates(queries, width, faiss_params)
            distances = self.space.distances(queries, rows, k, sums if self.direct else None)
            parts.append(order_exactly(rows, distances, k))
        if len(parts) == 1:
            return parts[0]
        return Neighbours(np.concatenate([part.rows for part in parts]),
                          np.concatenate([part.distances for part in parts]))


class ExhaustiveSearcher(FaissSearcher):
    """A flat index (or SQ8_direct over pixels): k+8 candidates by float32 distance, widened
    where rounding could hide a neighbour, so that the k returned are the exact k nearest."""

    def __init__(self, index: faiss.Index, space: RankingSpace,
                 defaults: Mapping | None = None, name: str = "index",
                 owner: faiss.Index | None = None) -> None:
        super().__init__(index, space, defaults, name, owner)
        self.direct = direct_distances(index, space)
        _ = space.max_squared_norm  # the margins need it: computed on load, not first search
        if space.integer and not self.direct:
            _ = space.float32  # so do the re-rank's sums

    def _search(self, features: np.ndarray, k: int, checked: dict,
                faiss_params: faiss.SearchParameters | None) -> Neighbours:
        def scan(queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
            return self._candidates(queries, width, faiss_params)

        return exact_by_widening(self.space, features, k, scan, self.direct)


Scan = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def exact_by_widening(space: RankingSpace, features: np.ndarray, k: int, scan: Scan,
                      direct: bool = False) -> Neighbours:
    """The exact k nearest rows of each query from a scan of every row in float32
    (`scan(queries, width)` -> the `width` nearest's float32 distances and rows, FAISS's
    flat search), re-ranked exactly (by the scan's own sums where `direct`), the candidate
    list widened where float32 rounding could hide a neighbour.

    Every row not returned has a float32 distance at least the last returned one; once that,
    less the rounding margin, exceeds the exact k-th distance, no unseen row can belong in
    the top k.
    """
    def ranked(queries: np.ndarray, rows: np.ndarray, sums: np.ndarray) -> Neighbours:
        return order_exactly(rows, space.distances(queries, rows, k, sums if direct else None),
                             k)

    width = min(k + RERANK_EXTRA, len(space))
    float_distances, rows = scan(features, width)
    best = ranked(features, rows, float_distances)
    margins = float32_margin(space.dimension) * (squared_norms(features)
                                                 + space.max_squared_norm)
    if space.integer:
        margins += 1  # integer distances: a tie at the k-th distance must be looked at
    rows_out, distances_out = best.rows.copy(), best.distances.copy()
    pending = np.flatnonzero(float_distances[:, -1] - margins <= best.distances[:, -1])
    while len(pending) and width < len(space):
        width = min(width * 4, len(space))
        still = np.zeros(len(pending), bool)
        block = max(1, RERANK_CELLS // width)  # many exact ties could ask for every row
        for start in range(0, len(pending), block):
            part = pending[start:start + block]
            more_float, more_rows = scan(features[part], width)
            more = ranked(features[part], more_rows, more_float)
            rows_out[part], distances_out[part] = more.rows, more.distances
            still[start:start + block] = more_float[:, -1] - margins[part] <= more.distances[:, -1]
        pending = pending[still]
    return Neighbours(rows_out, distances_out)


def exhaustive_searcher(space: RankingSpace, name: str = "exact") -> ExhaustiveSearcher:
    """Brute force over the space's own features: the ground truth of any index ranking
    there."""
    index = faiss.IndexFlatL2(space.dimension)
    index.add(space.float32)
    return ExhaustiveSearcher(index, space, name=name)


class CodesSearcher(FaissSearcher):
    """A compressed index ranked by its own distances (between the query and each row's
    codes), ordered by (distance, row): approximate, with nothing but the index in memory.
    Its recall is measured against exact search in the same space, like any index's."""

    def _search(self, features: np.ndarray, k: int, checked: dict,
                faiss_params: faiss.SearchParameters | None) -> Neighbours:
        distances, rows = self._candidates(features, k, faiss_params)
        return order_exactly(rows, np.where(rows >= 0, distances.astype(np.float64), np.inf),
                             k)


def ranks_after_transforms(recipe: Recipe) -> bool:
    """Whether the index's own transforms belong to the ranking space."""
    return recipe.rank_space in ("index", "codes")


def searched_index(recipe: Recipe, index: faiss.Index) -> faiss.Index:
    """The index FAISS searches: the inner one when the ranking happens after the index's
    own transforms (they are applied by the space), else the whole index."""
    if ranks_after_transforms(recipe) and isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_index(index.index)
    return index


def space_transforms(recipe: Recipe, index: faiss.Index) -> list[faiss.VectorTransform]:
    """The index's own transforms that belong to the ranking space."""
    return transforms_of(index) if ranks_after_transforms(recipe) else []
