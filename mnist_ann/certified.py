"""Certified-exact k-NN over pixels from PCA lower bounds, with a margin for float32 rounding.

A centred orthonormal projection A never lengthens a difference: |A(q - x)|² ≤ s·|q - x|², where
s is the largest squared singular value of the float32 matrix actually used (1 up to rounding).
Distances between projected vectors are therefore lower bounds of the true ones, once three
float32 errors are allowed for:

1. FAISS computes a squared distance between float32 vectors a, b with an error of at most
   `float_margin` · (|a|² + |b|²), the margin the flat index's own certification uses;
2. each projected coordinate A_i·x + b_i is a float32 dot product of 785 terms: off by at most
   g·|A_i|·(|x| + 2|μ|) with g = 785·2⁻²⁴ (b = -Aμ is itself rounded), so the difference of
   two projections is off by at most ε = √m · g · max|A_i| · (|q| + |x| + 4|μ|) in length;
3. s above, computed in float64 from the stored float32 matrix.

Everything is doubled for safety. The bound grows with the computed distance, so `radius` (its
inverse) gives, per query, the computed distance at or beyond which a row is certainly farther
than the query's k-th neighbour.

The search (`LowerBounds.search`) compares a query with most rows on 16 to 32 axes only, and
with the few that may be neighbours on all of them, then exactly. The training rows are split
into lists (k-means on the first SPAN_AXES axes; any split is correct, a good one is fast).
Per query:

1. each list's smallest bound on the first SPAN_AXES axes, by FAISS's fused k=1 kernel;
2. `candidates` rows, the nearest by bound (on `components` axes) in the query's best lists,
   verified exactly: their k-th exact distance τ is at least the true k-th;
3. the lists whose bound is under the radius of τ can hold a neighbour; the others cannot.
   A list's bound on the first 32 axes is the sum of its smallest bound on axes 0-15 and its
   smallest on axes 16-31 (each row's own bound is at least that sum);
4. in those lists, every row whose bound on `components` axes is under the radius, by one range
   search (a per-query extra coordinate turns the per-query radius into a common one);
5. those rows verified exactly: the k nearest among them are the exact answer, since every row
   left out is farther than τ, which is at least the true k-th distance.

Batches under SPLIT_BATCH queries use a single list of every row: steps 1 and 3 leave nothing
out, and step 4 is a full scan of the projection, cheaper for them than the lists' fixed cost.
"Queries scanning every list" (`fallback_queries`) are those for which no list could be left
out (with a single list, every query): their range search covers every row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import faiss
import numpy as np

from mnist_ann.recipes import flat_vectors

PROJECTION_ERROR = 2 * 785 * 2.0**-24  # g per unit length, doubled
# a list's bound adds its smallest bound over each span of SPAN_AXES axes, up to GROUP_SPANS
# spans: FAISS's fused k=1 kernel (10 to 16 dimensions) makes these scans cheap
SPAN_AXES = 16
GROUP_SPANS = 2
ROWS_PER_LIST = 200
FIRST_LISTS = 3  # the first candidates come from each query's best lists, at least this many
MAX_LISTS = 256
# smaller batches search one list of every row: the lists' fixed cost (a few FAISS calls per
# list) would outweigh what they save
SPLIT_BATCH = 64
VERIFY_CELLS = 1 << 15  # candidates verified at once, padded to the longest list among them
RADIUS_SLACK = 1e-6  # relative, and 1e-3 absolute: "at or beyond" becomes "strictly beyond"

# verify(query positions, candidate rows [n, w] padded with -1, k) -> (rows, exact distances)
Verify = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
Map = Callable[..., Iterator]  # map, or a thread pool's map


class LowerBounds:
    """The projected training set of a `PCA<D>,Flat` index, searched on its first m axes."""

    def __init__(self, index: faiss.IndexPreTransform, max_pixel_norm: float,
                 float_margin: float) -> None:
        if index.chain.size() != 1:
            raise ValueError("a certified index is PCA<D>,Flat: one transform, then Flat")
        self.pca = faiss.downcast_VectorTransform(index.chain.at(0))
        flat = faiss.downcast_index(index.index)
        if not isinstance(self.pca, faiss.PCAMatrix) or not isinstance(flat, faiss.IndexFlat):
            raise ValueError("a certified index is PCA<D>,Flat")
        self.dimension = int(self.pca.d_out)
        self.projected = flat_vectors(flat)
        self.matrix = faiss.vector_to_array(self.pca.A).reshape(
            self.pca.d_out, self.pca.d_in).astype(np.float64)
        self.mean_norm = float(np.linalg.norm(faiss.vector_to_array(self.pca.mean)))
        self.max_pixel_norm = max_pixel_norm
        self.float_margin = float_margin
        self._levels: dict[int, tuple[float, float, float]] = {}
        self._layouts: dict[bool, Lists] = {}

    def project(self, pixels: np.ndarray, components: int) -> np.ndarray:
        """float32 projections [n, components] of uint8 queries, as the index projected rows."""
        projected = self.pca.apply(np.ascontiguousarray(pixels, dtype=np.float32))
        return np.ascontiguousarray(projected[:, :components])

    def _level(self, components: int) -> tuple[float, float, float]:
        """On the first m axes: the rows' largest squared norm, the scale s, max |A_i|."""
        if components not in self._levels:
            wide = self.projected[:, :components].astype(np.float64)
            matrix = self.matrix[:components]
            self._levels[components] = (float(np.einsum("ij,ij->i", wide, wide).max()),
                                        float(np.linalg.norm(matrix, 2) ** 2),
                                        float(np.linalg.norm(matrix, axis=1).max()))
        return self._levels[components]

    def radius(self, kth_distances: np.ndarray, query_squared_norms: np.ndarray,
               projected: np.ndarray, components: int) -> np.ndarray:
        """Per query, the computed distance on m axes at or beyond which a row is certainly
        farther than `kth_distances` in pixels."""
        flat_error, needed = self._needed(kth_distances, query_squared_norms, projected,
                                          components)
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
        flat_error, needed = self._needed(kth_distances, query_squared_norms, projected,
                                          components)
        needed = needed * (1 + RADIUS_SLACK) + 1e-3
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

    def _needed(self, kth_distances: np.ndarray, query_squared_norms: np.ndarray,
                projected: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query: FAISS's float error on m axes, and the exact projected distance
        (√(kth·s) + ε)² beyond which the bound exceeds the k-th distance."""
        max_projected, scale, row_norm = self._level(components)
        wide = projected.astype(np.float64)
        flat_error = 2 * self.float_margin * (np.einsum("ij,ij->i", wide, wide) + max_projected)
        epsilon = (PROJECTION_ERROR * np.sqrt(components) * row_norm
                   * (np.sqrt(query_squared_norms) + self.max_pixel_norm + 4 * self.mean_norm))
        scale = 2 * scale - 1 if scale > 1 else 1.0  # its excess over 1 doubled
        return flat_error, (np.sqrt(kth_distances.astype(np.float64) * scale) + epsilon) ** 2

    def lists(self, split: bool) -> Lists:
        """The training rows in lists: split by k-means on the first SPAN_AXES axes (made once
        per load, seeded; correctness does not depend on it), or all in one list."""
        if split not in self._layouts:
            if split:
                axes = min(SPAN_AXES, self.dimension)
                vectors = np.ascontiguousarray(self.projected[:, :axes])
                count = int(np.clip(len(vectors) // ROWS_PER_LIST, 1, MAX_LISTS))
                kmeans = faiss.Kmeans(axes, count, niter=10, seed=1234, verbose=False)
                kmeans.train(vectors)
                _, assigned = kmeans.index.search(vectors, 1)
                order = np.argsort(assigned[:, 0], kind="stable")
                ends = np.cumsum(np.bincount(assigned[:, 0], minlength=count))[:-1]
                members = [rows for rows in np.split(order, ends) if len(rows)]
            else:
                members = [np.arange(len(self.projected))]
            self._layouts[split] = Lists(self.projected, members)
        return self._layouts[split]

    def search(self, pixels: np.ndarray, query_squared_norms: np.ndarray, k: int,
               components: int, candidates: int, verify: Verify,
               threads: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """The exact k nearest rows of each uint8 query and their distances, certified (see
        the module doc), with what it took."""
        split = len(pixels) >= SPLIT_BATCH
        layout = self.lists(split)
        members = layout.members
        n, lists = len(pixels), len(members)
        spans = [(start, min(start + SPAN_AXES, components))
                 for start in range(0, components, SPAN_AXES)][:GROUP_SPANS]
        indexes = layout.indexes(0, components, extra=True)
        projected = self.project(pixels, components)
        queries = np.zeros((n, components + 1), np.float32)  # the extra coordinate 0 for now
        queries[:, :components] = projected
        width = min(max(candidates, k), self.projected.shape[0])
        # split: many small FAISS calls, several at once, each on one thread; one list: a few
        # calls in this thread (other threads would only wait on each other)
        with (ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads, initargs=(1,))
              if split else nullcontext()) as pool:
            run = pool.map if pool is not None else map

            def each_list(work: Callable[[int], list]) -> list:
                return [part for parts in run(work, range(lists)) for part in parts]

            # 1. each list's smallest bound on the first span of axes
            _, first_stop = spans[0]
            firsts = layout.indexes(0, first_stop, extra=False)
            first_queries = np.ascontiguousarray(projected[:, :first_stop])
            minima = np.empty((lists, n), np.float32)

            def list_minimum(j: int) -> list:
                minima[j] = firsts[j].search(first_queries, 1)[0][:, 0]
                return []

            each_list(list_minimum)

            # 2. the `width` rows nearest by bound in each query's FIRST_LISTS best lists (or
            # enough lists to hold them), verified exactly
            sizes = np.sort([len(rows) for rows in members])
            first_lists = max(FIRST_LISTS, int(np.searchsorted(np.cumsum(sizes), width)) + 1)
            chosen = np.ones((lists, n), bool)
            if first_lists < lists:
                best = np.argpartition(minima, first_lists - 1, axis=0)[:first_lists]
                chosen[:] = False
                chosen[best, np.arange(n)] = True

            def nearest(j: int) -> list:
                asked = np.flatnonzero(chosen[j])
                if not len(asked):
                    return []
                bounds, local = indexes[j].search(queries[asked], min(width, len(members[j])))
                return [(np.repeat(asked, local.shape[1]), members[j][local.ravel()],
                         bounds.ravel())]

            found = each_list(nearest)
            query_of, row_of, bound = (np.concatenate([part[i] for part in found])
                                       for i in range(3))
            order = np.argsort(bound, kind="stable")  # by query, then bound: two quick sorts
            order = order[np.argsort(query_of[order], kind="stable")]
            query_of, row_of = query_of[order], row_of[order]
            starts = _starts(np.bincount(query_of, minlength=n))
            head = np.arange(len(query_of)) - starts[query_of] < width
            _, first_distances, first_counts = _verify_ragged(
                run, verify, n, query_of[head], row_of[head], k)
            kth = first_distances[:, k - 1].astype(np.float64)

            # 3. the lists that can hold a row within the k-th distance: their bound on the
            # first spans (the sum of their smallest bounds on each) is under the radius
            needed = minima < self.radius(kth, query_squared_norms, first_queries,
                                          first_stop)[None, :]
            for start, stop in spans[1:]:
                span_indexes = layout.indexes(start, stop, extra=False)
                span_queries = np.ascontiguousarray(projected[:, start:stop])
                radius = self.radius(kth, query_squared_norms, projected[:, :stop], stop)

                def refine(j: int, span_indexes=span_indexes, span_queries=span_queries,
                           radius=radius) -> list:
                    asked = np.flatnonzero(needed[j])
                    if len(asked):
                        minima[j, asked] += span_indexes[j].search(span_queries[asked], 1)[0][:, 0]
                        needed[j, asked] = minima[j, asked] < radius[asked]
                    return []

                with _blas_for_any_batch():
                    each_list(refine)

            # 4. in them, every row whose bound is under the radius: one range search
            radius, offsets = self.range_offsets(kth, query_squared_norms, projected,
                                                 components)
            queries[:, components] = offsets

            def within(j: int) -> list:
                asked = np.flatnonzero(needed[j])
                if not len(asked):
                    return []
                limits, _, local = indexes[j].range_search(queries[asked], radius)
                return [(np.repeat(asked, np.diff(limits.astype(np.int64))),
                         members[j][local])]

            found = each_list(within)
            # 5. verified exactly: every row left out is farther than the k-th distance
            rows, distances, counts = _verify_ragged(
                run, verify, n, np.concatenate([part[0] for part in found]),
                np.concatenate([part[1] for part in found]), k)
        scanned = needed.sum(axis=0)
        verified = first_counts + counts
        stats = {"components": components, "lists": lists,
                 "lists_scanned_median": float(np.median(scanned)),
                 "verified_median": float(np.median(verified)),
                 "verified_p99": float(np.percentile(verified, 99)),
                 "verified_max": int(verified.max()),
                 "fallback_queries": int((scanned == lists).sum())}
        return rows, distances, stats


@contextmanager
def _blas_for_any_batch() -> Iterator[None]:
    """FAISS's flat search takes its fast path (for k=1 the fused kernel) only from 128,000
    query components on; the refining spans search a few thousand 16-axis queries per list.
    The threshold is process-wide: it is restored on leaving."""
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


class Lists:
    """Training rows in lists, with flat indexes over ranges of axes of each list."""

    def __init__(self, projected: np.ndarray, members: list[np.ndarray]) -> None:
        self.projected = projected
        self.members = members
        self._indexes: dict[tuple, list[faiss.IndexFlatL2]] = {}

    def indexes(self, start: int, stop: int, extra: bool) -> list[faiss.IndexFlatL2]:
        """Per list, its rows on axes [start, stop), with the extra coordinate (0) if asked."""
        key = (start, stop, extra)
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


def _verify_ragged(run: Map, verify: Verify, n: int, query_of: np.ndarray,
                   row_of: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k best of each query's candidate rows, given as (query, row) pairs, verified in
    chunks of queries with similar counts; also the count per query."""
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


def _starts(counts: np.ndarray) -> np.ndarray:
    """Where each query's pairs begin once pairs are sorted by query."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]])
