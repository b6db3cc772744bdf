"""Load a verified index, search it with per-call parameters, re-rank exactly, and vote."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from mnist_ann.build import default_threads, set_threads
from mnist_ann.errors import IntegrityError, InvalidArgument, MnistAnnError
from mnist_ann.metrics import WEIGHTS, vote
from mnist_ann.mnist import N_PIXELS
from mnist_ann.recipes import check_search_parameters, index_layers, make_search_parameters
from mnist_ann.store import Collection

RERANK_EXTRA = 8
# FAISS computes |q|² + |x|² - 2 q·x in float32; over 784 terms its error stays far below
# 784 · 2⁻²⁴ · (|q|² + |x|²) ≈ 4.7e-5 · (|q|² + |x|²). Four times that is our safety margin.
FLOAT32_RELATIVE_MARGIN = 2e-4
MISSING = np.iinfo(np.int64).max
RERANK_CHUNK = 1024


@dataclass(frozen=True)
class Neighbours:
    """The k nearest training rows of each query, ordered by (exact distance, row).

    rows: int64 [n, k] positions in the training table (-1 where the index found fewer);
    distances: int64 [n, k] exact squared L2 distances (MISSING where rows is -1).
    """

    rows: np.ndarray
    distances: np.ndarray


@dataclass(frozen=True)
class Classification:
    """Predicted labels of a batch of queries, with their neighbours and timing."""

    predictions: np.ndarray
    neighbours: Neighbours
    neighbour_ids: np.ndarray  # MNIST-70k row ids [n, k], -1 where none
    params: dict
    k: int
    weights: str
    seconds: float
    threads: int
    stats: dict = field(default_factory=dict)


def squared_norms(pixels: np.ndarray) -> np.ndarray:
    wide = pixels.astype(np.int64)
    return np.einsum("ij,ij->i", wide, wide)


def exact_distances(train: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact integer squared L2 between each query [n, 784] and its candidate rows [n, c]."""
    result = np.full(rows.shape, MISSING, dtype=np.int64)
    for start in range(0, len(queries), RERANK_CHUNK):
        block = slice(start, start + RERANK_CHUNK)
        candidates = rows[block]
        diff = (train[np.maximum(candidates, 0)].astype(np.int16)
                - queries[block, None, :].astype(np.int16))
        # at most 784 · 255² < 2³¹, so int32 accumulation is exact
        squared = np.einsum("ncd,ncd->nc", diff, diff, dtype=np.int32).astype(np.int64)
        result[block] = np.where(candidates >= 0, squared, MISSING)
    return result


def order_exactly(rows: np.ndarray, distances: np.ndarray, k: int) -> Neighbours:
    """The k best candidates of each query by (distance, training row)."""
    order = np.lexsort((rows, distances), axis=1)[:, :k]
    return Neighbours(np.take_along_axis(rows, order, 1), np.take_along_axis(distances, order, 1))


class KnnIndex:
    """A collection's index, checked against its manifest, with the training table."""

    def __init__(self, collection: Collection, name: str) -> None:
        entry = collection.indexes.get(name)
        if entry is None:
            known = ", ".join(collection.indexes) or "none built yet"
            raise MnistAnnError(f"collection {collection.name!r} has no index {name!r} "
                                f"(built: {known}); build it with `mnist-ann build --index`")
        self.collection = collection
        self.name = name
        self.entry = entry
        self.index = load_verified_index(collection, entry)
        train = collection.train()
        if train.labels is None:
            raise MnistAnnError(f"{collection.name}: the training table has no labels")
        self.train_pixels = train.pixels
        self.train_labels = train.labels
        self.train_ids = train.ids
        self.classes = np.unique(train.labels)
        self.max_train_norm = int(squared_norms(train.pixels).max())
        self.exact = all(isinstance(layer, faiss.IndexFlat) for layer in index_layers(self.index))
        self._prepared: dict[tuple, tuple[dict, faiss.SearchParameters | None]] = {}

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _prepare(self, overrides: dict | None) -> tuple[dict, faiss.SearchParameters | None]:
        """Checked parameters and their FAISS objects, made once per distinct setting."""
        key = tuple(sorted((overrides or {}).items()))
        if key not in self._prepared:
            merged = {**self.entry.get("search_defaults", {}), **(overrides or {})}
            checked = check_search_parameters(self.index, merged, f"index {self.name!r}")
            self._prepared[key] = checked, make_search_parameters(self.index, checked)
        return self._prepared[key]

    def parameters(self, overrides: dict | None = None) -> dict:
        """The recipe's search defaults with `overrides` applied, checked against the index."""
        return dict(self._prepare(overrides)[0])

    def search(self, pixels: np.ndarray, k: int, params: dict | None = None) -> Neighbours:
        """The k nearest training rows of each uint8 query [n, 784], exactly ranked."""
        if not 1 <= k <= self.ntotal:
            raise InvalidArgument(f"k must be between 1 and the training size {self.ntotal}, "
                                  f"not {k}")
        _, faiss_params = self._prepare(params)
        queries = np.ascontiguousarray(pixels, dtype=np.float32)
        width = min(k + RERANK_EXTRA, self.ntotal)
        float_distances, rows = self.index.search(queries, width, params=faiss_params)
        exact = exact_distances(self.train_pixels, pixels, rows)
        best = order_exactly(rows, exact, k)
        if self.exact:
            best = self._certify(pixels, queries, k, faiss_params, best, float_distances, width)
        return best

    def _certify(self, pixels: np.ndarray, queries: np.ndarray, k: int,
                 faiss_params: faiss.SearchParameters | None, best: Neighbours,
                 float_distances: np.ndarray, width: int) -> Neighbours:
        """Widen the candidate list of queries where float32 rounding could hide a neighbour.

        With exhaustive search every row not returned has a float32 distance at least the
        last returned one; once that, less the rounding margin, exceeds the exact k-th
        distance, no unseen row can belong in the top k.
        """
        margins = FLOAT32_RELATIVE_MARGIN * (squared_norms(pixels) + self.max_train_norm) + 1
        rows_out, distances_out = best.rows.copy(), best.distances.copy()
        pending = np.flatnonzero(float_distances[:, -1] - margins <= best.distances[:, -1])
        while len(pending) and width < self.ntotal:
            width = min(width * 4, self.ntotal)
            more_float, more_rows = self.index.search(queries[pending], width,
                                                      params=faiss_params)
            more = order_exactly(more_rows, exact_distances(self.train_pixels, pixels[pending],
                                                            more_rows), k)
            rows_out[pending], distances_out[pending] = more.rows, more.distances
            still = more_float[:, -1] - margins[pending] <= more.distances[:, -1]
            pending = pending[still]
        return Neighbours(rows_out, distances_out)

    def classify(self, pixels: np.ndarray, k: int = 7, params: dict | None = None,
                 weights: str = "uniform", threads: int | None = None) -> Classification:
        """Predict a label for each uint8 query [n, 784] by a vote of its k neighbours."""
        if weights not in WEIGHTS:
            raise InvalidArgument(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        check_queries(pixels)
        threads = set_threads(threads or default_threads())
        effective = self.parameters(params)
        started = time.perf_counter()
        neighbours = self.search(pixels, k, params)
        labels = np.where(neighbours.rows >= 0,
                          self.train_labels[np.maximum(neighbours.rows, 0)].astype(np.int16), -1)
        predictions = vote(labels, neighbours.distances, self.classes, weights)
        seconds = time.perf_counter() - started
        ids = np.where(neighbours.rows >= 0, self.train_ids[np.maximum(neighbours.rows, 0)], -1)
        return Classification(predictions.astype(np.uint8), neighbours, ids, effective, k,
                              weights, seconds, threads)


def check_queries(pixels: np.ndarray) -> None:
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != N_PIXELS:
        raise InvalidArgument(f"queries must be uint8 [n, {N_PIXELS}], not "
                              f"{pixels.dtype}{list(pixels.shape)}")
    if len(pixels) == 0:
        raise InvalidArgument("no queries to classify: the input is empty")


def load_verified_index(collection: Collection, entry: dict) -> faiss.Index:
    """Read an index file once, check its sha256 against the manifest, then let FAISS parse it.

    FAISS parses the very bytes that were checked, so a file swapped in between cannot slip
    through; a damaged or hostile file never reaches FAISS's reader.
    """
    path = collection.root / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IntegrityError(f"{path} is missing; rebuild it with `mnist-ann build --force`"
                             ) from exc
    recorded = collection.manifest["files"].get(entry["file"], {}).get("sha256")
    if hashlib.sha256(data).hexdigest() != entry["sha256"] or recorded != entry["sha256"]:
        raise IntegrityError(f"{path} fails its checksum (changed since it was built); "
                             "rebuild it with `mnist-ann build --force`")
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def classify(collection: Collection, index_name: str, pixels: np.ndarray, k: int = 7,
             params: dict | None = None, weights: str = "uniform",
             threads: int | None = None) -> Classification:
    """Load `index_name` of `collection` and classify uint8 queries [n, 784]."""
    return KnnIndex(collection, index_name).classify(pixels, k, params, weights, threads)
