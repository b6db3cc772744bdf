"""What the indexes are measured against: scikit-learn's `KNeighborsClassifier` (the study's
method), and the peers hnswlib and FAISS's exact pruned search (Panorama), each timed like
the indexes and voted on by the same code."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from mnist_ann.api import Collection
from mnist_ann.evaluation.sweep import Reference, SweepSettings, measure, measured_row
from mnist_ann.evaluation.timing import time_single_queries
from mnist_ann.index.build import ADD_BATCH
from mnist_ann.index.neighbours import Neighbours, check_k, order_exactly
from mnist_ann.index.searchers import RERANK_EXTRA
from mnist_ann.index.space import RankingSpace
from mnist_ann.runtime import Log, Progress

SKLEARN_ROW = "scikit-learn"
HNSWLIB_ROW = "hnswlib"
HNSWLIB_BUILD = {"M": 16, "ef_construction": 200}
HNSWLIB_EF = [16, 32, 64, 128]  # its ef when the collection has no hnsw index to follow
PANORAMA_ROW = "faiss-panorama"
# (levels, batch size) the report measures; bench_exact.py sweeps more
PANORAMA_GRID = [(8, 512), (16, 512), (32, 512)]


def sklearn_row(collection: Collection, reference: Reference, settings: SweepSettings,
                log: Log) -> dict:
    """The original study's method: KNeighborsClassifier(n_neighbors=k).predict, measured."""
    from sklearn.neighbors import KNeighborsClassifier
    from threadpoolctl import threadpool_limits

    train = collection.train()
    space = collection.searcher("flat").space
    log(f"baseline: scikit-learn KNeighborsClassifier(n_neighbors={settings.k}) predict")
    with threadpool_limits(settings.threads):
        started = time.perf_counter()
        model = KNeighborsClassifier(n_neighbors=settings.k).fit(
            train.pixels.astype(np.float64), train.labels)
        fit_seconds = time.perf_counter() - started
        queries = reference.queries.astype(np.float64)
        started = time.perf_counter()
        predictions = model.predict(queries)
        seconds = time.perf_counter() - started
        _, rows = model.kneighbors(queries)
    with threadpool_limits(1):
        latency = time_single_queries(lambda q: model.predict(q.astype(np.float64)),
                                      reference.latency_sample,
                                      settings.latency_budget_seconds)
    distances = space.distances(reference.queries, rows)
    return measured_row(SKLEARN_ROW, "baseline",
                        f"KNeighborsClassifier(n_neighbors={settings.k})", {}, reference,
                        settings.k, distances, predictions, [seconds], latency, fit_seconds,
                        None)


class HnswlibSearcher:
    """hnswlib behind the searcher protocol: its own k results, ordered exactly.

    hnswlib's ef is a setting of the shared index (`set_ef`), not of a call: this searcher
    is for one thread at a time.
    """

    name = HNSWLIB_ROW

    def __init__(self, space: RankingSpace, threads: int, seed: int = 100) -> None:
        import hnswlib

        self.space = space
        self.index = hnswlib.Index(space="l2", dim=space.dimension)
        self.index.init_index(max_elements=len(space), **HNSWLIB_BUILD, random_seed=seed)
        self.index.set_num_threads(threads)
        self.index.add_items(space.float32, np.arange(len(space)))

    @property
    def ntotal(self) -> int:
        return len(self.space)

    def parameters(self, overrides: Mapping | None = None) -> dict:
        return {"ef": int((overrides or {}).get("ef", 64))}

    def search(self, queries: np.ndarray, k: int, params: Mapping | None = None) -> Neighbours:
        k = check_k(k, self.ntotal)
        features = self.space.embed(queries)
        self.index.set_ef(max(self.parameters(params)["ef"], k))
        import faiss

        found, _ = self.index.knn_query(features.astype(np.float32), k=k,
                                        num_threads=faiss.omp_get_max_threads())
        found = found.astype(np.int64)
        return order_exactly(found, self.space.distances(features, found), k)


def hnswlib_rows(collection: Collection, reference: Reference, settings: SweepSettings,
                 grid: list[int], log: Log, progress: Progress) -> list[dict]:
    """hnswlib as a peer, swept over its ef; its own k results vote, as it returns them."""
    log(f"peer: hnswlib {HNSWLIB_BUILD}, building")
    started = time.perf_counter()
    searcher = HnswlibSearcher(collection.searcher("flat").space, settings.threads)
    build_seconds = time.perf_counter() - started
    labels = collection.train().labels
    rows = []
    with progress("hnswlib", len(grid)) as bar:
        for ef in grid:
            result, times, latency = measure(searcher, labels, {"ef": ef}, reference, settings)
            rows.append(measured_row(
                HNSWLIB_ROW, "peer", f"hnswlib M={HNSWLIB_BUILD['M']} "
                f"efConstruction={HNSWLIB_BUILD['ef_construction']}", {"ef": ef}, reference,
                settings.k, result.neighbours.distances, result.predictions, times, latency,
                build_seconds, None))
            bar.update(1)
    return rows


def hnswlib_available() -> bool:
    try:
        import hnswlib  # noqa: F401
    except ImportError:
        return False
    return True


def panorama_available() -> bool:
    import faiss

    return hasattr(faiss, "IndexFlatL2Panorama")


def full_rotation(space: RankingSpace):
    """A full PCA of the space's rows (trained once, shared by every Panorama setting)."""
    import faiss

    rotation = faiss.PCAMatrix(space.dimension, space.dimension)
    rotation.train(space.float32)
    return rotation


class PanoramaSearcher:
    """FAISS's exact pruned flat search (`IndexFlatL2Panorama`, FAISS ≥ 1.13) behind the
    searcher protocol, configured as it needs: a full PCA rotation first (orthogonal, so
    distances keep their order up to rounding; it puts the energy in the leading levels
    that Panorama's bounds prune on). Its k+8 nearest are re-ranked exactly in the space,
    as flat's are, so its lists compare with flat's tie for tie."""

    name = PANORAMA_ROW

    def __init__(self, space: RankingSpace, levels: int, batch_size: int,
                 rotation=None) -> None:
        import faiss

        self.space, self.levels, self.batch_size = space, levels, batch_size
        vectors = space.float32
        self.rotation = rotation if rotation is not None else full_rotation(space)
        self.index = faiss.IndexFlatL2Panorama(space.dimension, levels, batch_size)
        for start in range(0, len(vectors), ADD_BATCH):
            self.index.add(self.rotation.apply(vectors[start:start + ADD_BATCH]))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def parameters(self, overrides: Mapping | None = None) -> dict:
        return {"levels": self.levels, "batch_size": self.batch_size}

    def search(self, queries: np.ndarray, k: int, params: Mapping | None = None) -> Neighbours:
        k = check_k(k, self.ntotal)
        features = self.space.embed(queries)
        rotated = self.rotation.apply(np.ascontiguousarray(features, dtype=np.float32))
        _, found = self.index.search(rotated, min(k + RERANK_EXTRA, self.ntotal))
        return order_exactly(found, self.space.distances(features, found, k), k)


def panorama_rows(collection: Collection, reference: Reference, settings: SweepSettings,
                  log: Log, progress: Progress, grid=PANORAMA_GRID) -> list[dict]:
    """FAISS Panorama as an exact peer, one index per (levels, batch size)."""
    if not panorama_available():
        log("peer: this FAISS has no IndexFlatL2Panorama (FAISS ≥ 1.13); no Panorama rows")
        return []
    space = collection.searcher("flat").space
    labels = collection.train().labels
    rotation = full_rotation(space)
    rows = []
    with progress("panorama", len(grid)) as bar:
        for levels, batch_size in grid:
            log(f"peer: FAISS IndexFlatL2Panorama levels={levels} batch={batch_size}, building")
            started = time.perf_counter()
            searcher = PanoramaSearcher(space, levels, batch_size, rotation)
            build_seconds = time.perf_counter() - started
            result, times, latency = measure(searcher, labels, {}, reference, settings)
            rows.append(measured_row(
                PANORAMA_ROW, "peer", "PCA784 rotation, IndexFlatL2Panorama",
                searcher.parameters(), reference, settings.k, result.neighbours.distances,
                result.predictions, times, latency, build_seconds, None))
            del searcher
            bar.update(1)
    return rows
