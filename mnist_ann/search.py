"""Load a verified index, search it with per-call parameters, re-rank exactly, and vote."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from mnist_ann.build import SPEC_FIELDS, default_threads, set_threads
from mnist_ann.certified import LowerBounds
from mnist_ann.errors import IntegrityError, InvalidArgument, MnistAnnError
from mnist_ann.metrics import WEIGHTS, vote
from mnist_ann.mnist import N_PIXELS
from mnist_ann.pipeline import apply_pipeline
from mnist_ann.recipes import (
    CANDIDATES,
    COMPONENTS,
    EXACT_PCA_CANDIDATES,
    check_search_parameters,
    flat_vectors,
    index_layers,
    make_search_parameters,
)
from mnist_ann.store import Collection

RERANK_EXTRA = 8
# FAISS computes |q|² + |x|² - 2 q·x in float32; over 784 terms its error stays far below
# 784 · 2⁻²⁴ · (|q|² + |x|²) ≈ 4.7e-5 · (|q|² + |x|²). Four times that is our safety margin.
FLOAT32_RELATIVE_MARGIN = 2e-4
MISSING = np.iinfo(np.int64).max  # the distance of a missing neighbour in integer spaces
RERANK_CHUNK = 1024
# float32 sums of integer squares are exact below 2²⁴ (every partial sum is an integer no
# larger than the total, and rounding is monotone, so a total at or above it stays there)
FLOAT32_EXACT_LIMIT = 2**24


@dataclass(frozen=True)
class Neighbours:
    """The k nearest training rows of each query, ordered by (exact distance, row).

    rows: int64 [n, k] positions in the training table (-1 where the index found fewer);
    distances: [n, k] squared L2 distances in the ranking space: exact int64 over pixels
    (MISSING where rows is -1), float64 over float32 features (inf where rows is -1).
    """

    rows: np.ndarray
    distances: np.ndarray
    stats: dict = field(default_factory=dict)


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


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    wide = vectors.astype(np.int64 if vectors.dtype == np.uint8 else np.float64)
    return np.einsum("ij,ij->i", wide, wide)


def exact_distances(train: np.ndarray, queries: np.ndarray, rows: np.ndarray,
                    train_float32: np.ndarray | None = None,
                    top: int | None = None) -> np.ndarray:
    """Exact squared L2 between each query [n, d] and its candidate rows [n, c].

    uint8 pixels give exact int64 distances: from FAISS's float32 SIMD sums when a float32
    copy of `train` is given (exact below 2²⁴, recomputed in integers at or above it), else in
    numpy integers. With `top`, sums at or above 2²⁴ are recomputed only for queries with
    fewer than `top` candidates below it: for the others such a distance cannot be among their
    `top` smallest, and stays its float32 sum (which, like the true distance, is ≥ 2²⁴).
    float32 features give their float32 squared differences summed by FAISS (as float64),
    every pair computed the same way.
    """
    if train.dtype != np.uint8:
        return _float_distances(train, queries, rows)
    if train_float32 is None:
        return _integer_distances(train, queries, rows)
    sums = _float_distances(train_float32, queries, rows)
    result = np.where(rows >= 0, sums, 0).astype(np.int64)
    result[rows < 0] = MISSING
    inexact = (sums >= FLOAT32_EXACT_LIMIT) & (rows >= 0)
    needed = inexact.any(axis=1)
    if top is not None:
        needed &= ((sums < FLOAT32_EXACT_LIMIT) & (rows >= 0)).sum(axis=1) < top
    large = np.flatnonzero(needed)
    if len(large):
        result[large] = _integer_distances(train, queries[large], rows[large])
    return result


def _integer_distances(train: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
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


def _float_distances(train: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    # FAISS's direct float32 squared differences, the same computation its HNSW and IVF
    # scanners use (no |q|² + |x|² - 2q·x cancellation), for every pair alike
    train = np.ascontiguousarray(train, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    result = np.empty(rows.shape, np.float32)
    faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(result), faiss.swig_ptr(queries),
                            faiss.swig_ptr(train), faiss.swig_ptr(rows), train.shape[1],
                            len(queries), rows.shape[1])
    return np.where(rows >= 0, result.astype(np.float64), np.inf)


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
        check_build_record(collection, name, entry)
        self.index = load_verified_index(collection, entry)
        self.pipeline = tuple(entry["pipeline"])
        # ranking in the index's space: its transforms (L2norm, PCA) are applied once, here,
        # and the wrapped index is searched directly
        self.transform: faiss.IndexPreTransform | None = None
        self.searched = self.index
        if entry["rank_space"] == "index" and isinstance(self.index, faiss.IndexPreTransform):
            self.transform = self.index
            self.searched = faiss.downcast_index(self.index.index)
        train = collection.train()
        if train.labels is None:
            raise MnistAnnError(f"{collection.name}: the training table has no labels")
        self.train_labels = train.labels
        self.train_ids = train.ids
        self.classes = np.unique(train.labels)
        self.train_features = self.features(train.pixels)
        if self.train_features.shape[1] != self.searched.d:
            raise IntegrityError(f"index {name!r} searches {self.searched.d}-dimensional "
                                 f"vectors but its pipeline gives {self.train_features.shape[1]}"
                                 "; rebuild it with `mnist-ann build --force`")
        self.max_train_norm = squared_norms(self.train_features).max()
        # pixels are re-ranked by FAISS's SIMD float32 sums, exact below 2²⁴ (see
        # exact_distances), which needs them as float32: a flat or HNSW index over the pixels
        # already holds them; otherwise a copy (4 bytes a pixel, 176 MB for 56,000)
        self._train_float32 = None
        if self.train_features.dtype == np.uint8:
            stored = flat_vectors(self.searched)
            self._train_float32 = (stored if stored is not None and stored.shape[1] == N_PIXELS
                                   else self.train_features.astype(np.float32))
        self.exact = all(isinstance(layer, faiss.IndexFlat)
                         for layer in index_layers(self.searched))
        self.certified = bool(entry.get("certified"))
        self.bounds = (LowerBounds(self.index, float(np.sqrt(self.max_train_norm)),
                                   FLOAT32_RELATIVE_MARGIN) if self.certified else None)
        self._prepared: dict[tuple, tuple[dict, faiss.SearchParameters | None]] = {}
        self._brute_force: faiss.IndexFlatL2 | None = None

    def _transforms(self) -> list[faiss.VectorTransform]:
        if self.transform is None:
            return []
        return [faiss.downcast_VectorTransform(self.transform.chain.at(i))
                for i in range(self.transform.chain.size())]

    @property
    def space(self) -> str:
        """The space of the final exact ranking, in words: pixels, deskew, PCA48, ..."""
        steps = [*self.pipeline, *map(describe_transform, self._transforms())]
        return " → ".join(steps) or "pixels"

    @property
    def space_key(self) -> str:
        """A file-name-safe key of the ranking space; a fitted transform makes it this index's
        own, so its key carries the index file's checksum."""
        key = "-".join(self.pipeline) or "pixels"
        return f"{key}-{self.entry['sha256'][:12]}" if self.transform is not None else key

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 queries [n, 784] in the ranking space: the pixels themselves when no pipeline
        or transform applies, else float32 features."""
        if not self.pipeline and self.transform is None:
            return pixels
        features = apply_pipeline(self.pipeline, pixels)
        for transform in self._transforms():
            features = transform.apply(features)
        return features

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _prepare(self, overrides: dict | None) -> tuple[dict, faiss.SearchParameters | None]:
        """Checked parameters and their FAISS objects, made once per distinct setting."""
        key = tuple(sorted((overrides or {}).items()))
        if key not in self._prepared:
            merged = {**self.entry.get("search_defaults", {}), **(overrides or {})}
            extra = {COMPONENTS: int, CANDIDATES: int} if self.bounds is not None else None
            checked = check_search_parameters(self.index, merged, f"index {self.name!r}",
                                              extra)
            if self.bounds is not None:
                checked = {COMPONENTS: self.bounds.dimension,
                           CANDIDATES: EXACT_PCA_CANDIDATES, **checked}
                limits = {COMPONENTS: (self.bounds.dimension, "the index's PCA dimension"),
                          CANDIDATES: (self.ntotal, "the training size")}
                for name, (top, what) in limits.items():
                    if checked[name] > top:
                        raise InvalidArgument(f"search parameter {name}={checked[name]} must "
                                              f"be a whole number from 1 to {top} ({what})")
            self._prepared[key] = checked, make_search_parameters(self.searched, checked)
        return self._prepared[key]

    def parameters(self, overrides: dict | None = None) -> dict:
        """The recipe's search defaults with `overrides` applied, checked against the index."""
        return dict(self._prepare(overrides)[0])

    def search(self, pixels: np.ndarray, k: int, params: dict | None = None) -> Neighbours:
        """The k nearest training rows of each uint8 query [n, 784], exactly ranked."""
        checked, faiss_params = self._prepare(params)
        if self.bounds is not None:
            return self._certified(pixels, k, checked[COMPONENTS], checked[CANDIDATES])
        return self._ranked(self.searched, self.exact, self.features(pixels), k, faiss_params,
                            checked.get(CANDIDATES))

    def _certified(self, pixels: np.ndarray, k: int, components: int,
                   candidates: int) -> Neighbours:
        """Exact neighbours by lower-bound pruning, certified for every query (certified.py)."""
        assert self.bounds is not None
        self._check_k(k)

        def verify(queries: np.ndarray, rows: np.ndarray,
                   top: int) -> tuple[np.ndarray, np.ndarray]:
            best = order_exactly(rows, self._top_distances(pixels[queries], rows, top), top)
            return best.rows, best.distances

        return Neighbours(*self.bounds.search(pixels, squared_norms(pixels), k, components,
                                              candidates, verify, faiss.omp_get_max_threads()))

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.ntotal:
            raise InvalidArgument(f"k must be between 1 and the training size {self.ntotal}, "
                                  f"not {k}")

    def exact_search(self, pixels: np.ndarray, k: int) -> Neighbours:
        """The certified exact k nearest neighbours in this index's ranking space, by brute
        force: the ground truth its recall is measured against."""
        if self.exact:
            return self.search(pixels, k)
        if self._brute_force is None:
            self._brute_force = faiss.IndexFlatL2(self.train_features.shape[1])
            self._brute_force.add(np.ascontiguousarray(self.train_features, dtype=np.float32))
        return self._ranked(self._brute_force, True, self.features(pixels), k, None)

    def _ranked(self, index: faiss.Index, exhaustive: bool, features: np.ndarray, k: int,
                faiss_params: faiss.SearchParameters | None,
                candidates: int | None = None) -> Neighbours:
        """Candidates from `index` (k+8, or `candidates` when given), exactly re-ranked."""
        self._check_k(k)
        queries = np.ascontiguousarray(features, dtype=np.float32)
        width = min(max(k, candidates) if candidates else k + RERANK_EXTRA, self.ntotal)
        float_distances, rows = index.search(queries, width, params=faiss_params)
        best = order_exactly(rows, self._top_distances(features, rows, k), k)
        if exhaustive:
            best = self._certify(index, features, queries, k, faiss_params, best,
                                 float_distances, width)
        return best

    def _top_distances(self, features: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
        """Distances in the ranking space between queries and their candidate rows, exact for
        every candidate that can be among the k nearest (see exact_distances)."""
        return exact_distances(self.train_features, features, rows, self._train_float32, k)

    def _certify(self, index: faiss.Index, features: np.ndarray, queries: np.ndarray, k: int,
                 faiss_params: faiss.SearchParameters | None, best: Neighbours,
                 float_distances: np.ndarray, width: int) -> Neighbours:
        """Widen the candidate list of queries where float32 rounding could hide a neighbour.

        With exhaustive search every row not returned has a float32 distance at least the
        last returned one; once that, less the rounding margin, exceeds the exact k-th
        distance, no unseen row can belong in the top k.
        """
        margins = FLOAT32_RELATIVE_MARGIN * (squared_norms(features) + self.max_train_norm)
        if features.dtype == np.uint8:
            margins += 1  # integer distances: a tie at the k-th distance must be looked at
        rows_out, distances_out = best.rows.copy(), best.distances.copy()
        pending = np.flatnonzero(float_distances[:, -1] - margins <= best.distances[:, -1])
        while len(pending) and width < self.ntotal:
            width = min(width * 4, self.ntotal)
            more_float, more_rows = index.search(queries[pending], width, params=faiss_params)
            more = order_exactly(more_rows,
                                 self._top_distances(features[pending], more_rows, k), k)
            rows_out[pending], distances_out[pending] = more.rows, more.distances
            still = more_float[:, -1] - margins[pending] <= more.distances[:, -1]
            pending = pending[still]
        return Neighbours(rows_out, distances_out)

    def votes(self, neighbours: Neighbours, weights: str = "uniform") -> np.ndarray:
        """scikit-learn's vote of each query's neighbours; missing neighbours do not vote."""
        labels = np.where(neighbours.rows >= 0,
                          self.train_labels[np.maximum(neighbours.rows, 0)].astype(np.int16), -1)
        return vote(labels, neighbours.distances, self.classes, weights)

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
        predictions = self.votes(neighbours, weights)
        seconds = time.perf_counter() - started
        ids = np.where(neighbours.rows >= 0, self.train_ids[np.maximum(neighbours.rows, 0)], -1)
        return Classification(predictions.astype(np.uint8), neighbours, ids, effective, k,
                              weights, seconds, threads, neighbours.stats)


def describe_transform(transform: faiss.VectorTransform) -> str:
    if isinstance(transform, faiss.PCAMatrix):
        return f"PCA{transform.d_out}"
    if isinstance(transform, faiss.NormalizationTransform):
        return "L2norm"
    return type(transform).__name__


def check_queries(pixels: np.ndarray) -> None:
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != N_PIXELS:
        raise InvalidArgument(f"queries must be uint8 [n, {N_PIXELS}], not "
                              f"{pixels.dtype}{list(pixels.shape)}")
    if len(pixels) == 0:
        raise InvalidArgument("no queries to classify: the input is empty")


def check_build_record(collection: Collection, name: str, entry: dict) -> None:
    """Refuse an index whose manifest entry no longer says how it was built.

    The build record is written beside the index, checksummed in the manifest, and names the
    index file's sha256: an edited pipeline, factory or ranking space is caught here.
    """
    rebuild = f"rebuild it with `mnist-ann build --collection {collection.name} --index " \
              f"{entry.get('recipe', name)} --force`"
    if "record" not in entry:
        raise IntegrityError(f"index {name!r} has no build record in the manifest (built by an "
                             f"older mnist-ann, or the manifest was edited); {rebuild}")
    record = json.loads(collection.verified(entry["record"]).read_text())
    if record.get("index_sha256") != entry.get("sha256"):
        raise IntegrityError(f"index {name!r}: its build record belongs to another index file; "
                             f"{rebuild}")
    for field_name in SPEC_FIELDS:
        if record.get(field_name) != entry.get(field_name):
            raise IntegrityError(
                f"index {name!r}: the manifest says {field_name} {entry.get(field_name)!r} but "
                f"the index was built with {record.get(field_name)!r} (the manifest was edited "
                f"after the build); restore the manifest or {rebuild}")


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
