"""The image distortion model (IDM, Keysers et al., IEEE PAMI 2007): a distance between two
digits that lets every pixel of the training digit move up to `warp` pixels to match the
query, compared on the 3x3 context of Sobel gradients around each pixel.

    IDM(q, t) = sum over query pixels p of  min over |d| <= warp of  ||C_q(p) - C_t(p + d)||²

where C(p) is the 3x3 neighbourhood of both gradient channels at p (18 numbers). The
training image is warped onto the query (the reverse loses a point of accuracy).

`idm_distances_reference` is the plain definition, for the tests; `idm_distances` is the
fast kernel (numba when installed, else vectorised numpy), checked against it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from mnist_ann.data.pipeline import deskew, sobel

SIDE = 28
WARP = 2
CONTEXT = 1  # a 3x3 context (the compiled kernel's box sums are written out for it)
LANE = 32  # the compiled kernel's row width: whole AVX2 and AVX-512 vectors, past the grid's 30
FAR = np.float32(1e30)  # the compiled kernel's "not allowed": far above any IDM distance


def gradient_features(images: np.ndarray) -> np.ndarray:
    """Sobel gradients [n, 2, 28, 28] float32 of images [n, 784] (or [n, 28, 28])."""
    gx, gy = sobel(images.reshape(-1, SIDE, SIDE).astype(np.float32) / 255.0)
    return np.ascontiguousarray(np.stack([gx, gy], axis=1), dtype=np.float32)


def contexts(features: np.ndarray) -> np.ndarray:
    """Each pixel's 3x3 context of both channels: [n, 28, 28, 18] (zero outside)."""
    n = len(features)
    padded = np.pad(features, ((0, 0), (0, 0), (CONTEXT, CONTEXT), (CONTEXT, CONTEXT)))
    parts = [padded[:, :, dy:dy + SIDE, dx:dx + SIDE] for dy in range(2 * CONTEXT + 1)
             for dx in range(2 * CONTEXT + 1)]
    return np.stack(parts, axis=-1).transpose(0, 2, 3, 1, 4).reshape(n, SIDE, SIDE, -1)


def idm_distances_reference(query: np.ndarray, train: np.ndarray,
                            warp: int = WARP) -> np.ndarray:
    """IDM of one query's features [2, 28, 28] to each of train [m, 2, 28, 28], by the
    definition, pixel by pixel (slow; for the tests)."""
    q = contexts(query[None])[0]
    t = contexts(train)
    out = np.zeros(len(train), np.float64)
    for c in range(len(train)):
        total = 0.0
        for y in range(SIDE):
            for x in range(SIDE):
                best = np.inf
                for dy in range(-warp, warp + 1):
                    for dx in range(-warp, warp + 1):
                        ty, tx = y + dy, x + dx
                        if 0 <= ty < SIDE and 0 <= tx < SIDE:
                            best = min(best, float(((q[y, x] - t[c, ty, tx]) ** 2).sum()))
                total += best
        out[c] = total
    return out


def _idm_numpy(query: np.ndarray, train: np.ndarray, warp: int) -> np.ndarray:
    q = contexts(query[None])[0]  # [28, 28, 18]
    t = contexts(train)  # [m, 28, 28, 18]
    big = np.float32(np.inf)
    padded = np.pad(t, ((0, 0), (warp, warp), (warp, warp), (0, 0)))
    inside = np.pad(np.ones((SIDE, SIDE), bool), warp)
    best = np.full((len(train), SIDE, SIDE), big, np.float32)
    for dy in range(2 * warp + 1):
        for dx in range(2 * warp + 1):
            shifted = padded[:, dy:dy + SIDE, dx:dx + SIDE]
            cost = ((shifted - q) ** 2).sum(-1)
            cost[:, ~inside[dy:dy + SIDE, dx:dx + SIDE]] = big
            np.minimum(best, cost, out=best)
    return best.sum((1, 2), dtype=np.float64)


def _make_numba_kernel():
    try:
        import numba
    except ImportError:
        return None

    # The cost of a pixel p and a displacement d, ||C_q(p) - C_t(p + d)||², is a 3x3 box sum
    # of D_d(r) = ||q(r) - t(r + d)||² (both channels, zero outside the image). For each
    # displacement, a row's sums of D_d over 3 columns are made straight from the two images
    # (each D_d value three times), then the 3 rows' sums added: about 20 operations a
    # (pixel, displacement) instead of 54. Writing D_d out and summing it back at column
    # offsets 1 and 2 left that loop scalar: 19 of 34 µs a comparison. The image's side and
    # the two channels are compile-time constants and every inner loop runs over one row's
    # view, which LLVM vectorises, over LANE columns: whole SIMD vectors with no remainder.
    # The columns past the image compute values that are never summed, and a displacement
    # that would leave the image is kept out by a cost of FAR instead of a shorter loop; FAR
    # is finite because fastmath assumes no infinities, it exceeds any distance, and the
    # displacement 0 is always allowed. The sums are written out for CONTEXT = 1. fastmath
    # lets them be reordered (the last bits change).
    side, grid = SIDE, SIDE + 2 * CONTEXT

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def kernel(query_padded, train, rows, warp, out):  # pragma: no cover - compiled
        pad = warp + CONTEXT
        width = LANE + 2 * CONTEXT + 2 * warp
        t0 = np.zeros((side + 2 * pad, width), np.float32)  # a training digit's two channels
        t1 = np.zeros((side + 2 * pad, width), np.float32)
        q0, q1 = query_padded[0], query_padded[1]
        across = np.empty((grid, LANE), np.float32)
        best = np.empty((side, LANE), np.float32)
        penalty = np.zeros((2 * warp + 1, LANE), np.float32)
        for dx in range(-warp, warp + 1):
            for x in range(side):
                if not 0 <= x + dx < side:
                    penalty[dx + warp, x] = FAR
        for c in range(rows.shape[0]):
            t = train[rows[c]]
            for y in range(side):
                for x in range(side):
                    t0[y + pad, x + pad] = t[0, y, x]
                    t1[y + pad, x + pad] = t[1, y, x]
            best[:] = FAR
            for dy in range(-warp, warp + 1):
                for dx in range(-warp, warp + 1):
                    shift = dx + warp
                    for i in range(grid):  # grid row i is image row i - CONTEXT
                        row0, row1 = t0[i + dy + warp], t1[i + dy + warp]
                        a0, a1, a_row = q0[i], q1[i], across[i]
                        for x in range(LANE):
                            e0 = a0[x] - row0[x + shift]
                            e1 = a1[x] - row1[x + shift]
                            f0 = a0[x + 1] - row0[x + 1 + shift]
                            f1 = a1[x + 1] - row1[x + 1 + shift]
                            g0 = a0[x + 2] - row0[x + 2 + shift]
                            g1 = a1[x + 2] - row1[x + 2 + shift]
                            a_row[x] = (e0 * e0 + e1 * e1 + f0 * f0 + f1 * f1
                                        + g0 * g0 + g1 * g1)
                    kept_out = penalty[dx + warp]
                    for y in range(max(0, -dy), min(side, side - dy)):
                        up, middle, down = across[y], across[y + 1], across[y + 2]
                        best_row = best[y]
                        for x in range(LANE):
                            best_row[x] = min(best_row[x],
                                              up[x] + middle[x] + down[x] + kept_out[x])
            total = 0.0
            for y in range(side):
                for x in range(side):
                    total += best[y, x]
            out[c] = total

    return kernel


_KERNEL = None
_KERNEL_TRIED = False


def fast_kernel():
    """The compiled kernel, or None without numba (compiled once per process, cached)."""
    global _KERNEL, _KERNEL_TRIED
    if not _KERNEL_TRIED:
        _KERNEL, _KERNEL_TRIED = _make_numba_kernel(), True
    return _KERNEL


def idm_distances(query: np.ndarray, train: np.ndarray, rows: np.ndarray,
                  warp: int = WARP) -> np.ndarray:
    """IDM of one query's features [2, 28, 28] to the training features train[rows]."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    kernel = fast_kernel()
    if kernel is None:
        return _idm_numpy(query, train[rows], warp)
    out = np.empty(len(rows), np.float64)
    # zero outside the image; LANE + 2·CONTEXT columns, as the kernel's 3-column sums read
    padded = np.zeros((2, SIDE + 2 * CONTEXT, LANE + 2 * CONTEXT), np.float32)
    padded[:, CONTEXT:CONTEXT + SIDE, CONTEXT:CONTEXT + SIDE] = query
    kernel(padded, train, rows, warp, out)
    return out


# --- the re-rank stage ---------------------------------------------------------------------

POOL, GATE, VOTE_K = "pool", "gate", "k"
MAX_POOL = 2000


class IdmSearcher:
    """Candidates from a base searcher, re-ranked by IDM over the deskewed digits' gradients.

    Parameters: `pool`, how many of the base searcher's nearest are re-ranked; `gate` m: a
    query whose first m candidates all carry one label is answered directly from the base
    searcher's k nearest (their distances are then the base space's), since the re-rank
    could hardly change its vote (gate = pool could not change it at all); the base
    searcher's own (nprobe, ...). Re-ranked queries' neighbours come ordered by (IDM
    distance, training row), with IDM distances. The ranked pool comes with them
    (`Neighbours.pool`): a prediction's confidence is drawn from it (classify.pool_confidence),
    in IDM terms where the query was re-ranked, so `gate` = `pool` gives the best rejection.
    `stats_name`: how the CLI labels the counts of gated and re-ranked queries.
    """

    stats_name = "idm"
    # what `tune --budget` chooses among: k, pool, gate (None: the whole pool, never gating
    # a query the re-rank could change)
    tuning_grid: ClassVar[dict] = {VOTE_K: (1, 3, 5, 7), POOL: (25, 50, 100, 200),
                                   GATE: (3, 5, 7, 10, None)}

    def __init__(self, base, train_pixels: np.ndarray, labels: np.ndarray,
                 defaults: dict, name: str) -> None:
        # the base searcher keeps its own defaults (nprobe, ...), not the re-rank's
        self.base = base.with_defaults({key: value for key, value in defaults.items()
                                        if key not in (POOL, GATE, VOTE_K)})
        self.default_k = defaults.get(VOTE_K)  # chosen with the pool and the gate
        self.name, self.space = name, base.space
        self.labels = np.asarray(labels)
        self.defaults = dict(defaults)
        self.features = gradient_features(deskew(train_pixels))
        self._prepared: dict = {}
        if fast_kernel() is not None:  # compiled (or read from numba's cache) on load
            idm_distances(self.features[0], self.features, np.zeros(1, np.int64))

    @property
    def ntotal(self) -> int:
        return self.base.ntotal

    def __repr__(self) -> str:
        return f"IdmSearcher({self.name!r}, {self.parameters()})"

    def with_defaults(self, defaults: dict) -> IdmSearcher:
        import copy

        other = copy.copy(self)
        other.defaults, other._prepared = dict(defaults), {}
        other.base = self.base.with_defaults({key: value for key, value in defaults.items()
                                              if key not in (POOL, GATE, VOTE_K)})
        other.default_k = defaults.get(VOTE_K)
        return other

    def parameters(self, overrides=None) -> dict:
        from mnist_ann.index.params import check_parameter

        merged = {**self.defaults, **(overrides or {})}
        merged.pop(VOTE_K, None)  # the classifier's, not a search parameter
        own = {key: merged.pop(key) for key in (POOL, GATE) if key in merged}
        checked = self.base.parameters(merged)
        top = min(MAX_POOL, self.ntotal)
        for key, value in own.items():
            checked[key] = check_parameter(key, value, int, top, "the most IDM re-ranks")
        checked.setdefault(POOL, 50)
        checked.setdefault(GATE, checked[POOL])
        checked.pop("candidates", None)
        return checked

    def search(self, queries: np.ndarray, k: int, params=None):
        from mnist_ann.index.neighbours import Neighbours, check_k
        from mnist_ann.index.space import pixel_queries

        checked = self.parameters(params)
        k = check_k(k, self.ntotal)
        pool, gate = max(checked[POOL], k), checked[GATE]
        base_params = {key: value for key, value in checked.items() if key not in (POOL, GATE)}
        found = self.base.search(queries, pool, {**base_params, "candidates": pool})
        first = self.labels[np.maximum(found.rows[:, :gate], 0)]
        gated = ((first == first[:, :1]) & (found.rows[:, :gate] >= 0)).all(axis=1)
        pool_rows = found.rows.copy()
        pool_distances = found.distances.astype(np.float64)
        todo = np.flatnonzero(~gated)
        if len(todo):
            candidates = found.rows[todo]
            scores = self.pool_distances(pixel_queries(queries)[todo], candidates)
            order = np.lexsort((candidates, scores), axis=-1)
            pool_rows[todo] = np.take_along_axis(candidates, order, axis=1)
            pool_distances[todo] = np.take_along_axis(scores, order, axis=1)  # -1 rows: inf
        # the ranked pool is kept: a gated query's in the candidate stage's distances, a
        # re-ranked one's by IDM (what the classifier's confidence is drawn from)
        return Neighbours(pool_rows[:, :k], pool_distances[:, :k],
                          {"gated": int(gated.sum()), "reranked": len(todo)},
                          Neighbours(pool_rows, pool_distances))

    def pool_distances(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """IDM distances [n, m] of pixel queries [n, 784] to the training rows [n, m] (inf
        where a row is -1), on as many threads as FAISS is set to use: the kernel releases
        the GIL."""
        import faiss

        query_features = gradient_features(deskew(queries))
        scores = np.full(rows.shape, np.inf)

        def compare(part: np.ndarray) -> None:
            for i in part:
                present = rows[i] >= 0
                scores[i, present] = idm_distances(query_features[i], self.features,
                                                   rows[i, present])

        workers = max(1, min(faiss.omp_get_max_threads(), len(rows)))
        parts = np.array_split(np.arange(len(rows)), workers)
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as threads:
                list(threads.map(compare, parts))
        else:
            compare(parts[0])
        return scores
