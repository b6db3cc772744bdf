"""Ranking spaces: where the final exact ranking of neighbours happens.

A space holds the training rows' features, the map from queries to features (a pipeline, an
index's own transforms, or nothing) and the exact distances between the two. Integer features
(pixels) give exact int64 squared distances; float features give float64 ones, every pair
computed the same way. One space is shared by every index that ranks in it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import faiss
import numpy as np

from mnist_ann.data.mnist import N_PIXELS, as_pixels
from mnist_ann.data.pipeline import apply_pipeline
from mnist_ann.errors import DataError, InvalidArgument
from mnist_ann.index.layers import describe_transform
from mnist_ann.index.neighbours import MISSING
from mnist_ann.kernels import kernels

RERANK_CHUNK = 1024
NORM_CHUNK = 8192
FEATURE_BLOCK = 8192  # training rows through a pipeline at a time: bounded memory
# float32 sums of integer squares are exact below 2²⁴ (every partial sum is an integer no
# larger than the total, and rounding is monotone, so a total at or above it stays there)
FLOAT32_EXACT_LIMIT = 2**24
# integers up to this size are exact in float32, and their squared distances fit int64
MAX_EXACT_INTEGER = 2**15
MAX_KERNEL_DIMENSION = 33_000  # uint8 vectors whose squared distances fit the kernel's int32


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    """Exact squared norms (int64 for integers, float64 otherwise), a chunk at a time."""
    kind = np.int64 if vectors.dtype.kind in "iub" else np.float64
    out = np.empty(len(vectors), kind)
    for start in range(0, len(vectors), NORM_CHUNK):
        chunk = vectors[start:start + NORM_CHUNK]
        out[start:start + NORM_CHUNK] = np.einsum("ij,ij->i", chunk, chunk, dtype=kind)
    return out


def float32_distances(train: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 copies of FAISS's float32 squared distances [n, c] from each query to its
    candidate `rows` of `train` (inf where a row is -1)."""
    # FAISS's direct float32 squared differences, the same computation its HNSW and IVF
    # scanners use (no |q|² + |x|² - 2q·x cancellation), for every pair alike
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    result = np.empty(rows.shape, np.float32)
    faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(result), faiss.swig_ptr(queries),
                            faiss.swig_ptr(train), faiss.swig_ptr(rows), train.shape[1],
                            len(queries), rows.shape[1])
    return np.where(rows >= 0, result.astype(np.float64), np.inf)


def _float64_distances(train: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    result = np.full(rows.shape, np.inf)
    for start in range(0, len(queries), RERANK_CHUNK):
        block = slice(start, start + RERANK_CHUNK)
        diff = train[np.maximum(rows[block], 0)] - queries[block, None, :].astype(np.float64)
        result[block] = np.where(rows[block] >= 0, np.einsum("ncd,ncd->nc", diff, diff), np.inf)
    return result


def _integer_distances(train: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    narrow = train.dtype == np.uint8 and queries.dtype == np.uint8
    # uint8: differences fit int16 and 784 · 255² < 2³¹, so int32 accumulation is exact
    diff_type, sum_type = (np.int16, np.int32) if narrow else (np.int64, np.int64)
    result = np.full(rows.shape, MISSING, dtype=np.int64)
    for start in range(0, len(queries), RERANK_CHUNK):
        block = slice(start, start + RERANK_CHUNK)
        candidates = rows[block]
        diff = (train[np.maximum(candidates, 0)].astype(diff_type)
                - queries[block, None, :].astype(diff_type))
        squared = np.einsum("ncd,ncd->nc", diff, diff, dtype=sum_type).astype(np.int64)
        result[block] = np.where(candidates >= 0, squared, MISSING)
    return result


def _compiled_distances(train: np.ndarray, queries: np.ndarray,
                        rows: np.ndarray) -> np.ndarray | None:
    """Exact squared distances [n, c] between uint8 rows and queries by the compiled kernel
    (reading a quarter of the bytes of FAISS's float32 sums: 0.06 s against 0.10 s for 896,000
    seed pairs on one thread), MISSING where a row is -1; None without the kernels."""
    compiled = kernels()
    if compiled is None or train.shape[1] > MAX_KERNEL_DIMENSION or not rows.size:
        return None
    train, queries = np.ascontiguousarray(train), np.ascontiguousarray(queries)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.max() >= len(train) or queries.shape != (len(rows), train.shape[1]):
        raise ValueError(f"{len(rows)} lists of rows up to {rows.max()} for queries "
                         f"{queries.shape} over training rows {train.shape}")
    result = np.empty(rows.shape, np.int64)
    compiled.pixel_distances(train.ctypes.data, train.shape[1], queries.ctypes.data,
                             rows.ctypes.data, rows.shape[1], 0, len(queries),
                             result.ctypes.data)
    result[rows < 0] = MISSING
    return result


class RankingSpace:
    """Training features in one space, the map from queries into it, and exact distances.

    features: training rows [n, d] in the space (integer or float), or a function making them
    (called once, on first use: a search whose index returns exact distances never needs
    them); embed(queries) maps raw queries to features of the same kind, checking them first.
    The float32 copy FAISS searches and the largest squared norm are likewise made once, when
    first needed.
    """

    def __init__(self, key: str, steps: list[str],
                 features: np.ndarray | Callable[[], np.ndarray],
                 embed: Callable[[np.ndarray], np.ndarray], owner: object = None,
                 shape: tuple[int, int] | None = None, dtype: np.dtype | None = None) -> None:
        self.key = key
        self.owner = owner  # what `embed` needs alive (the FAISS index owning its transforms)
        self.steps = steps
        self._embed = embed
        if callable(features):
            if shape is None or dtype is None:
                raise ValueError("features made later need their shape and dtype now")
            self._make, self._features = features, None
            self.shape, self.dtype = (int(shape[0]), int(shape[1])), np.dtype(dtype)
        else:
            self._make, self._features = None, features
            self.shape, self.dtype = features.shape, features.dtype
        self.integer = self.dtype.kind in "iub"
        self.missing = MISSING if self.integer else np.inf
        self._lock = threading.Lock()
        self._float32: np.ndarray | None = None
        self._float32_owner: object = None
        self._max_norm: float | None = None

    def __repr__(self) -> str:
        return f"RankingSpace({self.key!r}, {self.description}, {self.shape[0]:,} rows of " \
               f"{self.dimension})"

    @property
    def description(self) -> str:
        """The space in words: pixels, deskew → L2norm → PCA48, ..."""
        return " → ".join(self.steps) or "pixels"

    @property
    def dimension(self) -> int:
        return int(self.shape[1])

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def features(self) -> np.ndarray:
        """The training rows' features [n, d], made on first use."""
        with self._lock:
            if self._features is None:
                self._features = self._make()
            return self._features

    def embed(self, queries: np.ndarray) -> np.ndarray:
        """Queries as features of this space, after checking them."""
        return self._embed(queries)

    def adopt_float32(self, vectors: np.ndarray, owner: object) -> None:
        """Use `vectors` (FAISS's own copy of the training features as float32, kept alive by
        `owner`) instead of making another copy; in a float32 space they are the features."""
        if vectors.shape != self.shape:
            return
        with self._lock:
            if self._float32 is None:
                self._float32, self._float32_owner = vectors, owner
            if self._features is None and self.dtype == np.float32:
                self._features = vectors

    @property
    def float32(self) -> np.ndarray:
        """The training features as float32 [n, d] (exact for integers up to 2²⁴)."""
        features = self.features if self._float32 is None else None
        with self._lock:
            if self._float32 is None:
                self._float32 = np.ascontiguousarray(features, dtype=np.float32)
            return self._float32

    @property
    def max_squared_norm(self) -> float:
        features = self.features if self._max_norm is None else None
        with self._lock:
            if self._max_norm is None:
                self._max_norm = float(squared_norms(features).max(initial=0))
            return self._max_norm

    def distances(self, features: np.ndarray, rows: np.ndarray, top: int | None = None,
                  sums: np.ndarray | None = None) -> np.ndarray:
        """Exact squared L2 between each query's features [n, d] and its candidate rows [n, c].

        Integers: int64, from float32 sums of squared differences (exact below 2²⁴: FAISS's
        SIMD kernel, or `sums` an index computed that way), recomputed in integers at or above
        it. With `top`, such sums are recomputed only for queries with fewer than `top`
        candidates below 2²⁴: for the others they cannot be among the `top` smallest, and stay
        their float32 sum (which, like the true distance, is ≥ 2²⁴).
        Floats: float32 features by FAISS's float32 sums (or `sums`), float64 ones in float64.
        """
        if sums is not None:
            sums = np.where(rows >= 0, sums.astype(np.float64), np.inf)
        if not self.integer:
            if sums is not None:
                return sums
            if self.dtype == np.float32:
                return float32_distances(self.features, features, rows)
            return _float64_distances(self.features, features, rows)
        if sums is None and self.dtype == np.uint8 and features.dtype == np.uint8:
            exact = _compiled_distances(self.features, features, rows)
            if exact is not None:
                return exact
        if sums is None:
            sums = float32_distances(self.float32, features, rows)
        result = np.where(rows >= 0, sums, 0).astype(np.int64)
        result[rows < 0] = MISSING
        inexact = (sums >= FLOAT32_EXACT_LIMIT) & (rows >= 0)
        needed = inexact.any(axis=1)
        if top is not None:
            needed &= ((sums < FLOAT32_EXACT_LIMIT) & (rows >= 0)).sum(axis=1) < top
        large = np.flatnonzero(needed)
        if len(large):
            result[large] = _integer_distances(self.features, features[large], rows[large])
        return result

    def brute_force(self, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact distances without FAISS (the reference the fast path must equal)."""
        if self.integer:
            return _integer_distances(self.features, features, rows)
        return _float64_distances(self.features, features, rows)


def pixel_queries(queries: np.ndarray) -> np.ndarray:
    """Queries as uint8 pixels [n, 784]: whole numbers 0..255, [n, 784] or [n, 28, 28]."""
    try:
        return as_pixels(queries, "queries")
    except DataError as exc:
        raise InvalidArgument(str(exc)) from exc


def image_features(pipeline: tuple[str, ...], transforms: list[faiss.VectorTransform],
                   pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels [n, 784] through the pipeline, then the index's own transforms."""
    features = apply_pipeline(pipeline, pixels)
    for transform in transforms:
        features = transform.apply(features)
    return features


def image_space(key: str, pipeline: tuple[str, ...], transforms: list[faiss.VectorTransform],
                train_pixels: np.ndarray, owner: object = None) -> RankingSpace:
    """A space over MNIST images: the pixels, or the pipeline's features after the index's
    own transforms (which `owner`, the index holding them, keeps alive). Features other than
    the pixels are made on first use, a block of rows at a time."""
    def features_of(pixels: np.ndarray) -> np.ndarray:
        return image_features(pipeline, transforms, pixels)

    steps = [*pipeline, *map(describe_transform, transforms)]
    if not pipeline and not transforms:
        return RankingSpace(key, steps, train_pixels, pixel_queries, owner)
    dimension = transforms[-1].d_out if transforms else train_pixels.shape[1]

    def training_features() -> np.ndarray:
        out = np.empty((len(train_pixels), dimension), np.float32)
        for start in range(0, len(train_pixels), FEATURE_BLOCK):
            out[start:start + FEATURE_BLOCK] = features_of(
                train_pixels[start:start + FEATURE_BLOCK])
        return out

    return RankingSpace(key, steps, training_features,
                        lambda queries: features_of(pixel_queries(queries)), owner,
                        (len(train_pixels), dimension), np.float32)


def featureless_space(key: str, pipeline: tuple[str, ...],
                      transforms: list[faiss.VectorTransform], rows: int,
                      owner: object = None) -> RankingSpace:
    """A space over `rows` training images whose features are not kept (an exported model
    ranked by its index's own codes): queries map into it, training features are refused."""
    dimension = transforms[-1].d_out if transforms else N_PIXELS

    def no_features() -> np.ndarray:
        raise InvalidArgument(f"{key}: this model keeps no training features; exact search "
                              "over it needs the collection it was exported from")

    steps = [*pipeline, *map(describe_transform, transforms)]
    return RankingSpace(key, steps, no_features,
                        lambda queries: image_features(pipeline, transforms,
                                                       pixel_queries(queries)),
                        owner, (rows, dimension), np.float32)


def vector_space(train: np.ndarray) -> RankingSpace:
    """A space over any numeric vectors (the estimator's): small integers rank exactly in
    int64, anything else in float64."""
    train = np.asarray(train)
    small = (train.dtype.kind in "iub" and train.size > 0
             and int(np.abs(train).max()) <= MAX_EXACT_INTEGER)
    if small:
        dtype = np.uint8 if train.min() >= 0 and train.max() <= 255 else np.int32
        features = np.ascontiguousarray(train, dtype=dtype)
    else:
        features = np.ascontiguousarray(train, dtype=np.float64)
    dimension = features.shape[1]

    def embed(queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != dimension:
            raise InvalidArgument(f"queries must have shape [n, {dimension}], not "
                                  f"{list(queries.shape)}")
        if not np.issubdtype(queries.dtype, np.number) and queries.dtype != np.bool_:
            raise InvalidArgument(f"queries must be numbers, not {queries.dtype}")
        if features.dtype.kind == "f":
            return np.ascontiguousarray(queries, dtype=np.float64)
        if queries.size == 0:
            return np.ascontiguousarray(queries, dtype=features.dtype)
        low, high = queries.min(), queries.max()
        if (not np.isfinite(low) or not np.isfinite(high) or low < -MAX_EXACT_INTEGER
                or high > MAX_EXACT_INTEGER or not np.array_equal(queries, np.round(queries))):
            raise InvalidArgument(
                "this model was fitted on integers and ranks exactly in integers: its queries "
                f"must be whole numbers within ±{MAX_EXACT_INTEGER} (fit it on floats to "
                "query with floats)")
        narrow = features.dtype == np.uint8 and low >= 0 and high <= 255
        return np.ascontiguousarray(queries, dtype=np.uint8 if narrow else np.int32)

    return RankingSpace("vectors", [] if small else ["float64"], features, embed)

