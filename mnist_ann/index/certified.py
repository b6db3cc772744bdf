"""Certified-exact k-NN over pixels from PCA lower bounds, with a margin for float32 rounding.

A centred orthonormal projection A never lengthens a difference: |A(q - x)|² ≤ s·|q - x|², where
s is the largest squared singular value of the float32 matrix actually used (1 up to rounding).
Distances between projected vectors are therefore lower bounds of the true ones, once three
float32 errors are allowed for:

1. a squared distance between float32 vectors a, b is computed with an error of at most
   `float_margin` · (|a|² + |b|²), the margin the flat index's own certification uses;
2. each projected coordinate A_i·x + b_i is a float32 dot product of d+1 terms: off by at most
   g·|A_i|·(|x| + 2|μ|) with g = (d+1)·2⁻²⁴ (b = -Aμ is itself rounded), so the difference of
   two projections is off by at most ε = √m · g · max|A_i| · (|q| + |x| + 4|μ|) in length;
3. s above, computed in float64 from the stored float32 matrix.

Everything is doubled for safety. The bound grows with the computed distance, so `radius` (its
inverse) gives, per query, the computed distance at or beyond which a row is certainly farther
than the query's k-th neighbour.

The search compares a query with most rows on 16 to 32 axes only, and with the few that may be
neighbours on all of them, then exactly. The training rows are split into lists (k-means on
the first SPAN_AXES axes, made once when the searcher is made; any split is correct, a good one
is fast). Per query, in named steps:

1. `list_minima`: each list's smallest bound on the first SPAN_AXES axes (FAISS's fused k=1
   kernel);
2. `nearest_in_best_lists`: `candidates` rows, the nearest by bound (on `components` axes) in
   the query's best lists; verified exactly, their k-th exact distance τ is at least the true
   k-th;
3. `lists_in_play`: the lists whose bound is under the radius of τ can hold a neighbour; the
   others cannot. A list's bound on the first 32 axes is the sum of its smallest bound on axes
   0-15 and its smallest on axes 16-31 (each row's own bound is at least that sum);
4. `rows_within`: in those lists, every row whose bound on `components` axes is under the
   radius, by one range search (a per-query extra coordinate turns the per-query radius into a
   common one);
5. `VerifiedPairs` (by `verify_pairs`): those rows verified exactly, a bounded batch at a
   time: the k nearest among them are the exact answer, since every row left out is farther
   than τ, which is at least the true k-th distance.

Steps 1-4 come in two forms with the same answers. `IntegerSteps` works on integer bounds by
the compiled kernels (integer_bounds.py), where the extension is built and the setting is whole
chunks of 16 axes, at least 32, with at most 256 first candidates: each list's minimum is taken
on the first 32 axes at once, and the rows are found by a cascade of stops (16, 32, 64, ...,
`components` axes) instead of one range search. `FloatSteps` works on FAISS's float32
distances, as above, everywhere else.

A query that prunes nothing (a sixteenth of the rows found, or every list in play among many
such queries: random noise) is compared with every row instead (`compare_with_every_row`,
FAISS's scan, certified as the flat index's), and a batch asking for many first candidates
goes in blocks: memory never grows with queries x rows.

Batches under SPLIT_BATCH queries skip the lists (their fixed cost, a few FAISS calls per
list, outweighs what they save there) and go query by query (`point_search`): every row's
bound on the first POINT_STOPS[0] axes in SIMD passes of 8 axes, τ from the `candidates` rows
nearest on `components` axes among the POINT_POOL nearest on those first axes, then the bound
on more axes (the next stop, ..., all) for the rows still under τ's radius (over every row
again, while most are), and exact verification of those left. "Queries scanning every list"
(`fallback_queries`) are those for which no list could be left out (on this path every query:
it treats the rows as one list).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from mnist_ann import kernels
from mnist_ann.errors import InvalidArgument
from mnist_ann.index import integer_bounds
from mnist_ann.index.integer_bounds import CHUNK_AXES, MINIMA_AXES, IntegerLayout
from mnist_ann.index.layers import flat_vectors
from mnist_ann.index.neighbours import MISSING, Neighbours, order_exactly
from mnist_ann.index.recipes import CANDIDATES, COMPONENTS, EXACT_PCA_CANDIDATES
from mnist_ann.index.searchers import FaissSearcher, exact_by_widening, float32_margin
from mnist_ann.index.space import RankingSpace, float32_distances, squared_norms

UNIT_ROUNDING = 2.0**-24
PROJECT_ROWS = 2048  # queries projected at a time
# a list's bound adds its smallest bound over each span of SPAN_AXES axes, up to GROUP_SPANS
# spans: FAISS's fused k=1 kernel (10 to 16 dimensions) makes the first scan cheap
SPAN_AXES = 16
GROUP_SPANS = 2
ROWS_PER_LIST = 200
FIRST_LISTS = 3  # the first candidates come from each query's best lists, at least this many
MAX_LISTS = 256
# smaller batches go query by query (point_search): the lists' fixed cost (a few FAISS calls
# per list) would outweigh what they save
SPLIT_BATCH = 64
POINT_POOL = 256  # a single query's τ candidates: the nearest on the first axes, bounded fully
# a single query's bound is summed over these first axes, then all: the first on every row,
# each next one on the rows still within τ's radius
POINT_STOPS = (16, 32, 64)
# a span scanned over every row is summed in chunks of 8 axes: FAISS's one-query-to-many
# SIMD kernel has a special case for 8 dimensions, not 16 (56,000 rows: 0.06 ms a chunk
# against 0.55 for 16 axes at once)
AXIS_CHUNK = 8
# the first DENSE_SPANS spans may be scanned whole, each while more than DENSE_FRACTION of
# the rows is left (the hardest queries keep most rows after 16 axes): gathering a chosen
# row's next axes cost about 45 ns, scanning every row's 1-4 ns, so beyond about 5% of the
# rows the scan is cheaper (the 30 slowest of 1,000 queries: 1.43 -> 1.09 ms; at 2 spans
# and 25%, scanning the third span had not helped)
DENSE_SPANS = 3
DENSE_FRACTION = 0.05
POOL_STRIDE = 32  # nearest_rows' sample of the first bounds
# memory stays bounded whatever the queries (random noise puts every row within every radius,
# n x rows pairs): a list's range search asks at most CALL_CELLS (query, row) pairs at once,
# the pairs found are verified PAIR_BATCH or so at a time, and a batch is searched in blocks
# whose first candidates' columns stay under FIRST_CELLS (a batch of real digits is one block,
# one verification: 0.7 million pairs for the 14,000 seed test digits)
CALL_CELLS = 1 << 22
PAIR_BATCH = 1 << 22
FIRST_CELLS = 1 << 22
# a query with more rows than this share of the training set within its radius is compared
# with every row by FAISS's scan instead: verifying a row by its pixels costs about 0.3 µs on
# one thread, the scan about 15 ns a row in a batch of a few hundred queries or more (BLAS;
# 1,000 random-noise images took 15 s before, 0.7 s now; the seed test digits verify 2,390
# rows at most). A single query's scan reads every row on its own (about 6 ms for 56,000):
# the point path hands it over only past POINT_HARD_SHARE.
HARD_SHARE = 1 / 16
POINT_HARD_SHARE = 1 / 2
# queries with every list in play go to the scan before their rows are sought only when at
# least this many do (random noise): FAISS scans that many together by BLAS (0.8 ms a query,
# from about 164 queries of 784 pixels on), fewer one by one (6 ms a query), which costs more
# than the lists' path for the few real digits with every list in play (3 of the seed test
# set, 2,390 rows verified at most)
SCAN_BATCH = 128
VERIFY_CELLS = 1 << 15  # candidates verified at once, padded to the longest list among them
RADIUS_SLACK = 1e-6  # relative, and 1e-3 absolute: "at or beyond" becomes "strictly beyond"

# verify(query positions, candidate rows [n, w] padded with -1, k) -> (rows, exact distances)
Verify = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
Map = Callable[..., Iterator]  # map, or a thread pool's map


class LowerBounds:
    """The projected training set of a `PCA<D>,Flat` index, with the margins of its bounds."""

    def __init__(self, index: faiss.IndexPreTransform, max_pixel_norm: float,
                 float_margin: float) -> None:
        if not isinstance(index, faiss.IndexPreTransform) or index.chain.size() != 1:
            raise ValueError("a certified index is PCA<D>,Flat: one transform, then Flat")
        self.pca = faiss.downcast_VectorTransform(index.chain.at(0))
        flat = faiss.downcast_index(index.index)
        if not isinstance(self.pca, faiss.PCAMatrix) or not isinstance(flat, faiss.IndexFlat):
            raise ValueError("a certified index is PCA<D>,Flat")
        self.index = index  # keeps the projected vectors alive
        self.dimension = int(self.pca.d_out)
        self.projected = flat_vectors(flat)
        self.matrix = faiss.vector_to_array(self.pca.A).reshape(
            self.pca.d_out, self.pca.d_in).astype(np.float64)
        self.mean_norm = float(np.linalg.norm(faiss.vector_to_array(self.pca.mean)))
        self.max_pixel_norm = max_pixel_norm
        self.float_margin = float_margin
        self.projection_error = 2 * (self.pca.d_in + 1) * UNIT_ROUNDING  # g, doubled
        self._levels: dict[int, tuple[float, float, float]] = {}

    def project(self, pixels: np.ndarray, components: int) -> np.ndarray:
        """float32 projections [n, components] of queries, as the index projected rows: a part
        at a time, so that the float32 copy of the pixels stays small (freshly mapped memory
        costs here: the 14,000 seed test digits' 44 MB took 0.1 s to touch, 3 ms in parts)."""
        projected = np.empty((len(pixels), components), np.float32)
        for start in range(0, len(pixels), PROJECT_ROWS):
            part = np.ascontiguousarray(pixels[start:start + PROJECT_ROWS], dtype=np.float32)
            projected[start:start + len(part)] = self.pca.apply(part)[:, :components]
        return projected

    def prepare(self, stops: Sequence[int]) -> None:
        """The margins' constants for these numbers of first axes, now (each takes an SVD of
        the matrix's first rows: 0.13 s for 16, 32, 64 and 128, else paid by a first search)."""
        for m in stops:
            self._level(m)

    def _level(self, components: int) -> tuple[float, float, float]:
        """On the first m axes: the rows' largest squared norm, the scale s, max |A_i|
        (computed once per m; a value, so threads may share the cache)."""
        level = self._levels.get(components)
        if level is None:
            wide = self.projected[:, :components].astype(np.float64)
            matrix = self.matrix[:components]
            level = (float(np.einsum("ij,ij->i", wide, wide).max()),
                     float(np.linalg.norm(matrix, 2) ** 2),
                     float(np.linalg.norm(matrix, axis=1).max()))
            self._levels[components] = level
        return level

    def radius(self, kth_distances: np.ndarray, query_squared_norms: np.ndarray,
               projected: np.ndarray, components: int) -> np.ndarray:
        """Per query, the computed distance on m axes at or beyond which a row is certainly
        farther than `kth_distances` in pixels."""
        return self.radii(kth_distances, query_squared_norms, projected, [components])[:, 0]

    def radii(self, kth_distances: np.ndarray, query_squared_norms: np.ndarray,
              projected: np.ndarray, stops: Sequence[int]) -> np.ndarray:
        """`radius` [n, len(stops)] on the first m axes for each m in `stops` at once
        (`projected` on at least the last)."""
        flat_error, needed = self._needed(kth_distances[:, None], query_squared_norms[:, None],
                                          projected, stops)
        return (needed + flat_error) * (1 + RADIUS_SLACK) + 1e-3

    def range_offsets(self, kth_distances: np.ndarray, query_squared_norms: np.ndarray,
                      projected: np.ndarray, components: int) -> tuple[float, np.ndarray]:
        """One radius R and a float32 extra coordinate a per query such that, with a 0 in that
        coordinate for every row, a row computed at or beyond R from (query, a) is certainly
        farther than the query's k-th distance.

        FAISS computes D + a² (D: the exact distance of the float32 projections) within
        e = 2·float_margin·(|q|² + a² + max|x|²); so computed ≥ R gives D ≥ R - a² - e, and a²
        is chosen so that this is at least the distance `radius` needs before its own
        float error.
        """
        flat_error, needed = self._needed(kth_distances[:, None], query_squared_norms[:, None],
                                          projected, [components])
        flat_error, needed = flat_error[:, 0], needed[:, 0] * (1 + RADIUS_SLACK) + 1e-3
        largest = float((needed + flat_error).max())
        radius = np.float32(largest * (1 + RADIUS_SLACK) + 1)  # FAISS takes a float32 radius
        if float(radius) < largest:
            radius = np.nextafter(radius, np.float32(np.inf))
        # e = flat_error + 2·float_margin·a²
        squared = (float(radius) - needed - flat_error) / (1 + 2 * self.float_margin)
        offsets = np.sqrt(np.maximum(squared, 0)).astype(np.float32)
        too_far = offsets.astype(np.float64) ** 2 > squared
        offsets[too_far] = np.nextafter(offsets[too_far], np.float32(0))
        return float(radius), offsets

    def projected_radii(self, kth_distances: np.ndarray, query_squared_norms: np.ndarray,
                        projected: np.ndarray, stops: Sequence[int]) -> np.ndarray:
        """Per query and m in `stops` [n, len(stops)]: the exact distance between projections
        on the first m axes beyond which a row is certainly farther than `kth_distances`."""
        return self._needed(kth_distances[:, None], query_squared_norms[:, None], projected,
                            stops)[1]

    def _needed(self, kth_distances: np.ndarray, query_squared_norms: np.ndarray,
                projected: np.ndarray, stops: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per query [n, 1] and number m of first axes in `stops` [n, len(stops)]: the float
        error of a distance on m axes, and the exact projected distance (√(kth·s) + ε)²
        beyond which the bound exceeds the k-th distance."""
        max_projected, scale, row_norm = np.array([self._level(m) for m in stops]).T
        wide = projected[:, :max(stops)].astype(np.float64)
        prefix_norms = np.cumsum(wide * wide, axis=1)[:, np.asarray(stops) - 1]
        flat_error = 2 * self.float_margin * (prefix_norms + max_projected)
        epsilon = (self.projection_error * np.sqrt(stops) * row_norm
                   * (np.sqrt(query_squared_norms) + self.max_pixel_norm + 4 * self.mean_norm))
        scale = np.where(scale > 1, 2 * scale - 1, 1.0)  # its excess over 1 doubled
        return flat_error, (np.sqrt(kth_distances.astype(np.float64) * scale) + epsilon) ** 2


class Lists:
    """Training rows in lists, with flat indexes over ranges of axes of each list."""

    def __init__(self, projected: np.ndarray, members: list[np.ndarray]) -> None:
        self.projected = projected
        self.members = members
        self.sizes = np.array([len(rows) for rows in members])
        self._indexes: dict[tuple, list[faiss.IndexFlatL2]] = {}
        self._vectors: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.members)

    @classmethod
    def by_kmeans(cls, projected: np.ndarray, axes: int) -> Lists:
        """Rows grouped by k-means on their first `axes` axes (seeded)."""
        vectors = np.ascontiguousarray(projected[:, :axes])
        count = int(np.clip(len(vectors) // ROWS_PER_LIST, 1, MAX_LISTS))
        kmeans = faiss.Kmeans(axes, count, niter=10, seed=1234, verbose=False)
        kmeans.train(vectors)
        _, assigned = kmeans.index.search(vectors, 1)
        order = np.argsort(assigned[:, 0], kind="stable")
        ends = np.cumsum(np.bincount(assigned[:, 0], minlength=count))[:-1]
        return cls(projected, [rows for rows in np.split(order, ends) if len(rows)])

    def indexes(self, start: int, stop: int, extra: bool) -> list[faiss.IndexFlatL2]:
        """Per list, its rows on axes [start, stop), with the extra coordinate (0) if asked
        (made on first use, once, whichever thread asks first)."""
        key = (start, stop, extra)
        with self._lock:
            if key not in self._indexes:
                indexes = []
                for rows in self.members:
                    vectors = np.zeros((len(rows), stop - start + extra), np.float32)
                    vectors[:, :stop - start] = self.projected[rows, start:stop]
                    index = faiss.IndexFlatL2(stop - start + extra)
                    index.add(vectors)
                    indexes.append(index)
                self._indexes[key] = indexes
            return self._indexes[key]

    def vectors(self, start: int, stop: int) -> list[np.ndarray]:
        """Per list, its rows on axes [start, stop), contiguous."""
        key = (start, stop)
        with self._lock:
            if key not in self._vectors:
                self._vectors[key] = [np.ascontiguousarray(self.projected[rows, start:stop])
                                      for rows in self.members]
            return self._vectors[key]


def spans_of(components: int) -> list[tuple[int, int]]:
    """The spans of axes a list's bound adds up: [0, 16), [16, 32), at most GROUP_SPANS."""
    return [(start, min(start + SPAN_AXES, components))
            for start in range(0, components, SPAN_AXES)][:GROUP_SPANS]


def each_list(run: Map, lists: int, work: Callable[[int], list]) -> list:
    """`work(j)` for every list j (on the pool when `run` is a pool's map), parts joined."""
    return [part for parts in run(work, range(lists)) for part in parts]


def list_minima(layout: Lists, projected: np.ndarray, run: Map) -> np.ndarray:
    """Step 1: each list's smallest computed distance [lists, n] to each query on the first
    span of axes (a lower bound of every row in it, up to the margins)."""
    _, stop = spans_of(projected.shape[1])[0]
    firsts = layout.indexes(0, stop, extra=False)
    queries = np.ascontiguousarray(projected[:, :stop])
    minima = np.empty((len(layout), len(projected)), np.float32)

    def minimum(j: int) -> list:
        minima[j] = firsts[j].search(queries, 1)[0][:, 0]
        return []

    each_list(run, len(layout), minimum)
    return minima


def first_columns(layout: Lists, width: int) -> tuple[int, int]:
    """Step 2's shape: how many best lists a query's first `width` candidates come from (at
    least FIRST_LISTS, or enough to hold `width` rows), and the columns kept per list."""
    sizes = np.sort(layout.sizes)
    first_lists = min(len(layout),
                      max(FIRST_LISTS, int(np.searchsorted(np.cumsum(sizes), width)) + 1))
    return first_lists, min(width, int(sizes[-1]))


def nearest_in_best_lists(layout: Lists, minima: np.ndarray, extended: np.ndarray,
                          width: int, run: Map) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: (query, row) pairs of the `width` rows nearest by bound to each query in its
    best lists by `minima` (at least FIRST_LISTS of them, or enough to hold `width` rows).

    `extended` holds the projected queries and an extra coordinate, 0 here."""
    n, components = len(extended), extended.shape[1] - 1
    indexes = layout.indexes(0, components, extra=True)
    first_lists, per = first_columns(layout, width)
    if first_lists < len(layout):
        best = np.argpartition(minima, first_lists - 1, axis=0)[:first_lists]
    else:
        best = np.repeat(np.arange(len(layout))[:, None], n, axis=1)
    # each query's nearest from its s-th best list go to columns [s·per, s·per + per): one
    # argpartition a query then picks its `width`, where sorting all the pairs cost twice as
    # much as the searches themselves
    bounds = np.full((n, first_lists * per), np.inf, np.float32)
    rows = np.full((n, first_lists * per), -1, np.int64)
    # (slot, query) cells of `best` grouped by list, once, instead of a scan of it per list
    by_list = np.argsort(best, axis=None, kind="stable")
    ends = np.searchsorted(best.ravel()[by_list], np.arange(len(layout) + 1))

    def nearest(j: int) -> list:
        slots, asked = np.divmod(by_list[ends[j]:ends[j + 1]], n)
        if not len(asked):
            return []
        found, local = indexes[j].search(extended[asked], min(per, int(layout.sizes[j])))
        columns = slots[:, None] * per + np.arange(local.shape[1])[None, :]
        bounds[asked[:, None], columns] = found  # each (query, slot) is one list's: no overlap
        rows[asked[:, None], columns] = layout.members[j][local]
        return []

    each_list(run, len(layout), nearest)
    rows = np.take_along_axis(rows, np.argpartition(bounds, width - 1, axis=1)[:, :width], 1)
    present = rows >= 0
    return np.repeat(np.arange(n), present.sum(axis=1)), rows[present]


def _smallest_distances(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """min over rows of the float32 squared distance to each query: FAISS's BLAS distance
    matrix (|q|² + |x|² - 2 q·x), on the calling thread's OpenMP threads."""
    queries = np.ascontiguousarray(queries)
    distances = np.empty((len(queries), len(rows)), np.float32)
    faiss.pairwise_L2sqr(queries.shape[1], len(queries), faiss.swig_ptr(queries), len(rows),
                         faiss.swig_ptr(rows), faiss.swig_ptr(distances))
    return distances.min(axis=1)


def lists_in_play(layout: Lists, bounds: LowerBounds, minima: np.ndarray, kth: np.ndarray,
                  query_norms: np.ndarray, projected: np.ndarray, run: Map) -> np.ndarray:
    """Step 3: which lists [lists, n] can hold a row within each query's k-th distance.

    A list is out once its bound (the sum of its smallest distances over the first spans of
    axes) reaches the radius of the k-th distance on those axes. `minima` gains the later
    spans' minima where they were needed."""
    spans = spans_of(projected.shape[1])
    _, first_stop = spans[0]
    needed = minima < bounds.radius(kth, query_norms, projected[:, :first_stop],
                                    first_stop)[None, :]
    for start, stop in spans[1:]:
        span_vectors = layout.vectors(start, stop)
        span_queries = np.ascontiguousarray(projected[:, start:stop])
        radius = bounds.radius(kth, query_norms, projected[:, :stop], stop)

        def refine(j: int, span_vectors=span_vectors, span_queries=span_queries,
                   radius=radius) -> list:
            asked = np.flatnonzero(needed[j])
            if len(asked):
                minima[j, asked] += _smallest_distances(span_queries[asked], span_vectors[j])
                needed[j, asked] = minima[j, asked] < radius[asked]
            return []

        each_list(run, len(layout), refine)
    return needed


Found = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def rows_within(layout: Lists, needed: np.ndarray, extended: np.ndarray, radius: float,
                run: Map, found: Found, skip: np.ndarray | None = None) -> None:
    """Step 4: every row, in each query's lists in play, whose computed distance to (query,
    offset) is under `radius`, by one range search per list (or per CALL_CELLS pairs), given
    to `found(queries, counts, rows)` as it comes: query i's counts[i] rows, in order. Queries
    marked in `skip` (which may grow meanwhile) are no longer asked."""
    components = extended.shape[1] - 1
    indexes = layout.indexes(0, components, extra=True)

    def within(j: int) -> list:
        for part in asked_in_parts(layout, needed, j, skip):
            limits, _, local = indexes[j].range_search(extended[part], radius)
            found(part, np.diff(limits.astype(np.int64)), layout.members[j][local])
        return []

    each_list(run, len(layout), within)


def asked_in_parts(layout: Lists, needed: np.ndarray, j: int,
                   skip: np.ndarray | None) -> Iterator[np.ndarray]:
    """The queries list j is asked for in step 4 (in play, not marked in `skip`), at most
    CALL_CELLS (query, row) pairs' worth at a time."""
    asked = np.flatnonzero(needed[j])
    if skip is not None:
        asked = asked[~skip[asked]]
    step = max(1, CALL_CELLS // int(layout.sizes[j]))
    for start in range(0, len(asked), step):
        yield asked[start:start + step]


class FloatSteps:
    """Steps 1-4 of one block of queries by FAISS's float32 distances (any setting)."""

    def __init__(self, layout: Lists, bounds: LowerBounds, projected: np.ndarray,
                 norms: np.ndarray, width: int) -> None:
        self.layout, self.bounds, self.projected, self.norms = layout, bounds, projected, norms
        self.width = width
        self.components = projected.shape[1]
        self.extended = np.zeros((len(projected), self.components + 1), np.float32)
        self.extended[:, :self.components] = projected  # the extra coordinate 0 for now

    def first_candidates(self, run: Map) -> tuple[np.ndarray, np.ndarray]:
        """Steps 1 and 2: (query, row) pairs to verify first."""
        self.minima = list_minima(self.layout, self.projected, run)
        return nearest_in_best_lists(self.layout, self.minima, self.extended, self.width, run)

    def lists_in_play(self, kth: np.ndarray, run: Map) -> np.ndarray:
        """Step 3, given the k-th distances of the first candidates."""
        needed = lists_in_play(self.layout, self.bounds, self.minima, kth, self.norms,
                               self.projected, run)
        self.radius, offsets = self.bounds.range_offsets(kth, self.norms, self.projected,
                                                         self.components)
        self.extended[:, self.components] = offsets
        return needed

    def seek(self, needed: np.ndarray, run: Map, found: Found, skip: np.ndarray) -> None:
        """Step 4."""
        rows_within(self.layout, needed, self.extended, self.radius, run, found, skip)


class IntegerSteps:
    """Steps 1-4 of one block of queries on integer bounds (integer_bounds's kernels): the
    lists' minima on the first 32 axes, the first candidates nearest on all axes in the best
    lists, and, in the lists in play, the rows within every stop's threshold (16, 32, 64, ...
    axes; a row is dropped at the first it exceeds)."""

    def __init__(self, integer: IntegerLayout, layout: Lists, bounds: LowerBounds,
                 projected: np.ndarray, norms: np.ndarray, width: int, parts: int) -> None:
        self.integer, self.layout, self.bounds = integer, layout, bounds
        self.projected, self.norms, self.width, self.parts = projected, norms, width, parts
        self.components = projected.shape[1]
        self.stops = point_stops(self.components)
        self.queries = integer.quantize(projected)

    @staticmethod
    def fits(integer: IntegerLayout | None, components: int, width: int) -> bool:
        """Whether the kernels serve this setting (whole chunks of 16 axes, at least 32)."""
        return (integer is not None and components % CHUNK_AXES == 0
                and MINIMA_AXES <= components <= integer.axes
                and width <= integer_bounds.MAX_WIDTH)

    def first_candidates(self, run: Map) -> tuple[np.ndarray, np.ndarray]:
        self.minima = self.integer.list_minima(self.queries, run, self.parts)
        first_lists, _ = first_columns(self.layout, self.width)
        best = np.argpartition(self.minima, first_lists - 1, axis=0)[:first_lists] \
            if first_lists < len(self.layout) else np.argsort(self.minima, axis=0)
        rows = self.integer.nearest(self.queries, best.T, self.width, self.components, run,
                                    self.parts)
        present = rows >= 0
        return np.repeat(np.arange(len(rows)), present.sum(axis=1)), rows[present]

    def lists_in_play(self, kth: np.ndarray, run: Map) -> np.ndarray:
        needed = self.bounds.projected_radii(kth, self.norms, self.projected, self.stops)
        thresholds = self.integer.thresholds(needed, self.queries, self.stops)
        self.limits = self.integer.limits(thresholds, self.queries, self.stops)
        return self.minima <= thresholds[:, self.stops.index(MINIMA_AXES)][None, :]

    def seek(self, needed: np.ndarray, run: Map, found: Found, skip: np.ndarray) -> None:
        def within(j: int) -> list:
            for part in asked_in_parts(self.layout, needed, j, skip):
                query_of, rows = self.integer.within(j, self.queries, part, self.limits,
                                                     self.stops)
                if len(rows):  # grouped by query, in order
                    firsts = np.flatnonzero(np.diff(query_of, prepend=-1))
                    found(query_of[firsts], np.diff(firsts, append=len(rows)), rows)
            return []

        each_list(run, len(self.layout), within)


class VerifiedPairs:
    """Step 5 as step 4's rows arrive: each query's k exactly nearest among the (query, row)
    pairs found, verified PAIR_BATCH or so at a time, so that memory stays bounded whatever
    the range searches return. A query found with more than `most_rows` rows is marked
    `hard` and its rows are dropped: comparing it with every row is cheaper (the caller's).
    Safe to feed from several threads."""

    def __init__(self, n: int, k: int, verify: Verify, most_rows: int) -> None:
        self.n, self.k, self.verify, self.most_rows = n, k, verify, most_rows
        self.rows = np.full((n, k), -1, np.int64)
        self.distances = np.full((n, k), MISSING, np.int64)
        self.counts = np.zeros(n, np.int64)  # rows found, hard queries' included
        self.hard = np.zeros(n, bool)
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._size = 0
        self._merged = False
        self._lock = threading.Lock()  # the parts, counts and marks
        self._merging = threading.Lock()  # the k best so far

    def __call__(self, queries: np.ndarray, counts: np.ndarray, rows: np.ndarray) -> None:
        with self._lock:
            self.counts[queries] += counts  # a list's queries are distinct
            self.hard[queries[self.counts[queries] > self.most_rows]] = True
            query_of = np.repeat(queries, counts)
            keep = ~self.hard[query_of]
            self._parts.append((query_of[keep], rows[keep]))
            self._size += int(keep.sum())
            if self._size < PAIR_BATCH:
                return
            parts, self._parts, self._size = self._parts, [], 0
        self._verify(parts, map)  # on this worker: the pool's other workers go on searching

    def mark_hard(self, queries: np.ndarray) -> None:
        """Mark these queries (a mask) hard before their rows come."""
        with self._lock:
            self.hard |= queries

    def finish(self, run: Map) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The k best rows and distances of each query, its rows found, and the hard
        queries (whose rows and distances are not meaningful)."""
        parts, self._parts, self._size = self._parts, [], 0
        self._verify(parts, run)
        return self.rows, self.distances, self.counts, self.hard

    def _verify(self, parts: list[tuple[np.ndarray, np.ndarray]], run: Map) -> None:
        if not parts:
            return
        query_of = np.concatenate([part[0] for part in parts]).astype(np.int64)
        row_of = np.concatenate([part[1] for part in parts]).astype(np.int64)
        keep = ~self.hard[query_of]  # queries marked since their rows came
        query_of, row_of = query_of[keep], row_of[keep]
        rows, distances, _ = verify_pairs(run, self.verify, self.n, query_of, row_of, self.k)
        with self._merging:
            if not self._merged:  # the first (usually the only) batch: nothing to merge
                self.rows, self.distances, self._merged = rows, distances, True
                return
            touched = np.unique(query_of)
            best = order_exactly(np.hstack([self.rows[touched], rows[touched]]),
                                 np.hstack([self.distances[touched], distances[touched]]),
                                 self.k)
            self.rows[touched], self.distances[touched] = best.rows, best.distances


def verify_pairs(run: Map, verify: Verify, n: int, query_of: np.ndarray,
                 row_of: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 5: the k best of each query's candidate rows, given as (query, row) pairs,
    verified exactly in chunks of queries with similar counts; also the count per query."""
    order = np.argsort(query_of, kind="stable")
    row_of = row_of[order]
    counts = np.bincount(query_of, minlength=n)
    starts = _starts(counts)
    by_count = np.argsort(counts, kind="stable")
    chunks, first = [], 0
    for last in range(1, n + 1):  # counts grow along by_count: a chunk's width is its last
        if last == n or (last + 1 - first) * max(counts[by_count[last]], k) > VERIFY_CELLS:
            chunks.append(by_count[first:last])
            first = last
    rows = np.empty((n, k), np.int64)
    distances = np.empty((n, k), np.int64)  # pixel distances are exact integers

    def chunk(queries: np.ndarray) -> None:
        width = max(int(counts[queries[-1]]), k)
        slots = np.arange(width)[None, :]
        present = slots < counts[queries][:, None]
        candidates = np.full((len(queries), width), -1, np.int64)
        candidates[present] = row_of[(starts[queries][:, None] + slots)[present]]
        rows[queries], distances[queries] = verify(queries, candidates, k)

    list(run(chunk, chunks))
    return rows, distances, counts


def _distances_to_all(query: np.ndarray, chunks: Sequence[np.ndarray]) -> np.ndarray:
    """float32 squared distances from one query to every row, the rows' axes given in
    consecutive `chunks` [n, d_i], by FAISS's direct SIMD sums of squared differences (as
    `float32_distances` computes for chosen rows), the chunks' sums added."""
    query = np.ascontiguousarray(query, dtype=np.float32)
    total = np.zeros(len(chunks[0]), np.float32)
    part = np.empty_like(total)
    start = 0
    for vectors in chunks:
        stop = start + vectors.shape[1]
        # a named copy: swig_ptr holds no reference, and a freed temporary may be reused
        # by another thread before FAISS reads it
        axes = query[start:stop].copy()
        faiss.fvec_L2sqr_ny(faiss.swig_ptr(part), faiss.swig_ptr(axes),
                            faiss.swig_ptr(vectors), stop - start, len(vectors))
        total += part
        start = stop
    return total


def axis_chunks(start: int, stop: int) -> list[tuple[int, int]]:
    """Axes [start, stop) in chunks of AXIS_CHUNK (the last may be shorter)."""
    return [(a, min(a + AXIS_CHUNK, stop)) for a in range(start, stop, AXIS_CHUNK)]


def nearest_rows(values: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` smallest values (ties either way; all when there are no
    more): a threshold from every POOL_STRIDE-th value first, so that argpartition orders
    the few hundred under it, not every row (0.07 ms against 0.21 for 56,000)."""
    if count >= len(values):
        return np.arange(len(values))
    sample = values[::POOL_STRIDE]
    rank = 2 * count // POOL_STRIDE + 1
    if rank < len(sample):
        under = np.flatnonzero(values <= np.partition(sample, rank)[rank])
        if len(under) >= count:
            return under[np.argpartition(values[under], count - 1)[:count]]
    return np.argpartition(values, count - 1)[:count]


def _distances_to(query: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The same from one query to the `rows` of `vectors`."""
    return float32_distances(vectors, query[None, :], rows[None, :])[0]


def point_stops(components: int) -> list[int]:
    """The numbers of first axes a single query's bound grows through: POINT_STOPS, then all."""
    return [m for m in POINT_STOPS if m < components] + [components]


def point_search(bounds: LowerBounds, chunks: list[list[np.ndarray]], spans: list[np.ndarray],
                 all_axes: np.ndarray, verify: Verify, position: int, projected: np.ndarray,
                 norm: np.ndarray, k: int, width: int,
                 most_rows: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """One query's exact k nearest rows (and how many rows were verified), certified: every
    row left out has a bound, on the first m axes for some m in `point_stops`, at or beyond
    the radius of τ, the k-th exact distance of `width` verified rows. None when more than
    `most_rows` rows are left before the last stop: a scan of every row is cheaper then.

    `chunks` hold every row on the first spans of axes (up to the first stops) in
    `axis_chunks`, scanned whole; `spans` every row on each span up to a stop but the last,
    contiguously, gathered for chosen rows (spans[0] is not read). A span is scanned whole
    while more than DENSE_FRACTION of the rows are still under the radius."""
    stops = point_stops(all_axes.shape[1])
    partial = _distances_to_all(projected[:stops[0]], chunks[0])
    nearest_first = nearest_rows(partial, max(POINT_POOL, width))
    full = _distances_to(projected, all_axes, nearest_first)
    seeds = nearest_first[np.argsort(full, kind="stable")[:width]]
    _, seed_distances = verify(np.array([position]), np.sort(seeds)[None, :], k)
    radii = bounds.radii(seed_distances[:, k - 1], norm, projected[None, :], stops)[0]
    survivors = None  # every row, until few enough are left to gather
    for level in range(len(stops)):
        if level:
            start, stop = stops[level - 1], stops[level]
            if level == len(stops) - 1:
                if len(survivors) > most_rows:
                    return None
                partial = _distances_to(projected, all_axes, survivors)
            elif survivors is None:
                partial = partial + _distances_to_all(projected[start:stop], chunks[level])
            else:
                partial = partial + _distances_to(projected[start:stop], spans[level],
                                                  survivors)
        inside = partial < radii[level]
        # every row left out is already certified; a row kept longer is only checked again
        if survivors is None and level + 1 < min(len(chunks), len(stops) - 1) \
                and np.count_nonzero(inside) > DENSE_FRACTION * len(partial):
            continue
        survivors = np.flatnonzero(inside) if survivors is None else survivors[inside]
        partial = partial[inside]
    rows, distances = verify(np.array([position]), survivors[None, :], k)
    return rows[0], distances[0], width + len(survivors)


def percentile(values: np.ndarray, q: float) -> float:
    """np.percentile's linear interpolation, without its overhead (a single query's stats
    took 0.15 ms through it)."""
    ordered = np.sort(values)
    position = q / 100 * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _starts(counts: np.ndarray) -> np.ndarray:
    """Where each query's pairs begin once pairs are sorted by query."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]])


class CertifiedSearcher(FaissSearcher):
    """Exact neighbours by lower-bound pruning of a `PCA<D>,Flat` index over integer
    features, certified for every query (see the module doc)."""

    def __init__(self, index: faiss.Index, space: RankingSpace,
                 defaults: Mapping | None = None, name: str = "exact-pca") -> None:
        if not space.integer:
            raise InvalidArgument(f"{name}: certified search verifies exact integer distances; "
                                  "its data must be integers (pixels)")
        super().__init__(index, space, defaults, name)
        self.bounds = LowerBounds(index, float(np.sqrt(space.max_squared_norm)),
                                  float32_margin(space.dimension))
        dimension = self.bounds.dimension
        self.extra_parameters = {
            COMPONENTS: (int, dimension, "the index's PCA dimension"),
            CANDIDATES: (int, self.ntotal, "the training size")}
        # the lists, and what a batch search at the default setting uses, are made here,
        # when the index is loaded, not on a first search (small batches' single list, and
        # other settings, on first use)
        self.layouts = {True: Lists.by_kmeans(self.bounds.projected,
                                              min(SPAN_AXES, dimension)),
                        False: Lists(self.bounds.projected, [np.arange(self.ntotal)])}
        defaults = self.parameters()
        components = defaults[COMPONENTS]
        split = self.layouts[True]
        compiled = kernels.kernels()
        # the batch search's bounds in integers where the extension is built, else by FAISS
        self.integer = (IntegerLayout(self.bounds.projected, split.members, compiled)
                        if compiled is not None else None)
        self.bounds.prepare(sorted({*point_stops(components), *(stop for _, stop in
                                                               spans_of(components))}))
        if not IntegerSteps.fits(self.integer, components, defaults[CANDIDATES]):
            split.indexes(0, components, extra=True)
            split.indexes(0, spans_of(components)[0][1], extra=False)
            for start, stop in spans_of(components)[1:]:
                split.vectors(start, stop)
        _ = space.float32  # the verification's sums

    def _complete(self, checked: dict) -> dict:
        return {COMPONENTS: self.bounds.dimension, CANDIDATES: EXACT_PCA_CANDIDATES,
                **checked}

    def _search(self, features: np.ndarray, k: int, checked: dict,
                faiss_params: faiss.SearchParameters | None) -> Neighbours:
        rows, distances, stats = self.certified(features, k, checked[COMPONENTS],
                                                checked[CANDIDATES],
                                                faiss.omp_get_max_threads())
        return Neighbours(rows, distances, stats)

    def _verify(self, pixels: np.ndarray) -> Verify:
        def verify(queries: np.ndarray, rows: np.ndarray,
                   top: int) -> tuple[np.ndarray, np.ndarray]:
            best = order_exactly(rows, self.space.distances(pixels[queries], rows, top), top)
            return best.rows, best.distances

        return verify

    def certified(self, pixels: np.ndarray, k: int, components: int, candidates: int,
                  threads: int = 1) -> tuple[np.ndarray, np.ndarray, dict]:
        """The exact k nearest rows of each query and their distances, certified, with what
        it took (lists scanned, rows verified)."""
        if len(pixels) < SPLIT_BATCH:
            return self._point_queries(pixels, k, components, candidates)
        layout = self.layouts[True]
        width = min(max(candidates, k), self.ntotal)
        first_lists, per = first_columns(layout, width)
        block = max(SPLIT_BATCH, FIRST_CELLS // (first_lists * per))
        parts = [self._list_search(pixels[start:start + block], k, components, width, threads)
                 for start in range(0, len(pixels), block)]
        rows, distances, scanned, verified, whole = (np.concatenate(part)
                                                     for part in zip(*parts, strict=True))
        bounds = (f"integer ({self.integer.kernels.name})"
                  if IntegerSteps.fits(self.integer, components, width) else "float32 (faiss)")
        return rows, distances, self._stats(components, len(layout), scanned, verified, whole,
                                            bounds)

    def _list_search(self, pixels: np.ndarray, k: int, components: int, width: int,
                     threads: int) -> tuple[np.ndarray, ...]:
        """Steps 1-5 for one block of queries: rows, distances, lists scanned, rows verified
        and whether it was compared with every row, per query."""
        layout = self.layouts[True]
        n = len(pixels)
        norms = squared_norms(pixels)
        projected = self.bounds.project(pixels, components)
        if IntegerSteps.fits(self.integer, components, width):
            steps = IntegerSteps(self.integer, layout, self.bounds, projected, norms, width,
                                 parts=4 * threads)
        else:
            steps = FloatSteps(layout, self.bounds, projected, norms, width)
        verify = self._verify(pixels)
        found = VerifiedPairs(n, k, verify, int(HARD_SHARE * self.ntotal))
        # many small calls (FAISS's or the kernels'), several at once, each on one thread
        with ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads,
                                initargs=(1,)) as pool:
            run = pool.map
            query_of, row_of = steps.first_candidates(run)
            _, first, first_counts = verify_pairs(run, verify, n, query_of, row_of, k)
            needed = steps.lists_in_play(first[:, k - 1].astype(np.float64), run)
            everywhere = needed.all(axis=0) if len(layout) > 1 else np.zeros(n, bool)
            if found.most_rows < self.ntotal and everywhere.sum() >= SCAN_BATCH:
                found.mark_hard(everywhere)  # many may find every row: scanned together
            steps.seek(needed, run, found, skip=found.hard)
            rows, distances, counts, hard = found.finish(run)
        verified = first_counts + counts
        self._scan_hard(pixels, k, hard, rows, distances, verified)  # the caller's threads
        return rows, distances, needed.sum(axis=0), verified, hard

    def _scan_hard(self, pixels: np.ndarray, k: int, hard: np.ndarray, rows: np.ndarray,
                   distances: np.ndarray, verified: np.ndarray) -> None:
        """The answers of the `hard` queries, in place, by a scan of every row."""
        if hard.any():
            exact = self.compare_with_every_row(pixels[hard], k)
            rows[hard], distances[hard], verified[hard] = exact.rows, exact.distances, self.ntotal

    def compare_with_every_row(self, pixels: np.ndarray, k: int) -> Neighbours:
        """The exact k nearest of each query by FAISS's float32 scan of every row (BLAS in a
        batch), certified as the flat index certifies it, without a flat index's copy."""
        train = self.space.float32

        def scan(queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
            return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), train, width)

        return exact_by_widening(self.space, pixels, k, scan)

    def _point_queries(self, pixels: np.ndarray, k: int, components: int,
                       candidates: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """A small batch, query by query (point_search), in the calling thread."""
        whole = self.layouts[False]
        stops = point_stops(components)
        starts = [0, *stops[:-1]]
        spans = [whole.vectors(start, stop)[0] if start else None
                 for start, stop in zip(starts[:-1], stops[:-1], strict=True)]
        chunks = [[whole.vectors(a, b)[0] for a, b in axis_chunks(start, stop)]
                  for start, stop in zip(starts[:DENSE_SPANS], stops[:DENSE_SPANS],
                                         strict=False)]
        all_axes = (self.bounds.projected if components == self.bounds.dimension
                    else whole.vectors(0, components)[0])
        n = len(pixels)
        norms = squared_norms(pixels)
        projected = self.bounds.project(pixels, components)
        width = min(max(candidates, k), self.ntotal)
        verify = self._verify(pixels)
        rows = np.empty((n, k), np.int64)
        distances = np.empty((n, k), np.int64)
        verified = np.empty(n, np.int64)
        hard = np.zeros(n, bool)
        most_rows = int(POINT_HARD_SHARE * self.ntotal)
        for i in range(n):
            found = point_search(self.bounds, chunks, spans, all_axes, verify, i, projected[i],
                                 norms[i:i + 1], k, width, most_rows)
            if found is None:
                hard[i] = True
            else:
                rows[i], distances[i], verified[i] = found
        self._scan_hard(pixels, k, hard, rows, distances, verified)
        return rows, distances, self._stats(components, 1, np.ones(n, np.int64), verified, hard,
                                            "float32 (faiss)")

    @staticmethod
    def _stats(components: int, lists: int, scanned: np.ndarray, verified: np.ndarray,
               whole: np.ndarray, bounds: str) -> dict:
        return {"components": components, "bounds": bounds, "lists": lists,
                "lists_scanned_median": percentile(scanned, 50),
                "verified_median": percentile(verified, 50),
                "verified_p99": percentile(verified, 99),
                "verified_max": int(verified.max()),
                "fallback_queries": int((scanned == lists).sum()),
                "whole_scan_queries": int(whole.sum())}
