"""Sweeps of each index's search settings against exact ground truth, and the baselines.

Each row measures one setting: recall@k against exact search in the index's ranking space,
accuracy of the vote, agreement with the exact vote, batch throughput and single-query
latency (timing.py), and what the index costs. The rows go to the rendering (render/).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import numpy as np

from mnist_ann.api import Collection
from mnist_ann.classify import Classifier
from mnist_ann.cluster import Cluster
from mnist_ann.errors import InvalidArgument, MnistAnnError
from mnist_ann.evaluation.metrics import accuracy, fewest_rejections, recall
from mnist_ann.evaluation.timing import (
    MIN_LATENCY_QUERIES,
    WARM_UP_QUERIES,
    time_batch,
    time_single_queries,
)
from mnist_ann.evaluation.truth import ground_truth, rerank_pool_truth, rerank_whole_set_truth
from mnist_ann.index.neighbours import Neighbours
from mnist_ann.index.recipes import focus_of, grid_points
from mnist_ann.index.searchers import Searcher
from mnist_ann.machine import describe_machine, peak_memory_mb
from mnist_ann.runtime import Log, Progress, ProgressBar, faiss_threads, no_progress, silent
from mnist_ann.store.collection import resident_bytes

RECALL_TARGETS = (0.90, 0.95, 0.99, 0.999)
ACCURACY_TOLERANCE = 0.001
REJECTION_MAX_ERROR = 0.001  # the rejection operating point: fewest rejections for this error
# certified-exact indexes: lists scanned and rows verified per query, queries scanning all lists
CERTIFIED_COLUMNS = ["lists_scanned_median", "verified_median", "verified_p99", "fallback_queries"]


@dataclass(frozen=True)
class SweepSettings:
    """How to measure: k, repeats of the batch run, queries timed one at a time, threads, and
    whether to sweep each recipe's whole grid or a focused part of it."""

    k: int = 7
    repeats: int = 3
    latency_queries: int = 300
    threads: int = 2
    full: bool = False
    sample: int | None = None  # test queries measured (a seeded sample), all when None
    batch_budget_seconds: float = 5.0
    latency_budget_seconds: float = 2.0
    whole_set_queries: int = 10  # re-ranked indexes: queries compared with every training row

    def grid(self, entry: dict) -> dict:
        """The settings of an index to sweep: its whole grid, or its focused part."""
        return dict(entry.get("search_grid") or {}) if self.full else focus_of(entry)

    def describe(self) -> str:
        grid = ("every setting of each recipe's grid" if self.full else
                "the focused part of each recipe's grid (a few settings that show the trade-off, "
                "and the default setting; `--full` sweeps all)")
        queries = ("all test queries" if self.sample is None
                   else f"a seeded sample of {self.sample:,} test queries")
        return (f"{grid}; {queries}; batch: all of them in one call with {self.threads} "
                "threads, after a "
                f"warm-up on {WARM_UP_QUERIES} queries, median of {self.repeats} runs (fewer, "
                f"at least 1, once {self.batch_budget_seconds:g} s are spent: see batch_runs); "
                f"latency: up to {self.latency_queries} queries one at a time with 1 thread "
                f"(at least {MIN_LATENCY_QUERIES}, fewer once "
                f"{self.latency_budget_seconds:g} s are spent: see latency_queries), "
                "percentiles of the per-query wall time (search, exact re-rank and vote); a "
                "one-parameter grid stops at the first setting that returns the exact "
                "neighbours for every query (larger settings only search more)")


@dataclass(frozen=True)
class Reference:
    """What every row is measured against: labels, and the exact neighbours and exact vote in
    the row's ranking space (pixels for the raw indexes and the baselines)."""

    queries: np.ndarray
    labels: np.ndarray
    truth: Neighbours
    exact_predictions: np.ndarray
    latency_sample: np.ndarray
    space: str = "pixels"
    rows: np.ndarray | None = None  # the test rows measured, all when None
    k: int | None = None  # the k of this reference when it is not the evaluation's

    @property
    def exact_accuracy(self) -> float:
        return accuracy(self.exact_predictions, self.labels)


def measured_row(name: str, kind: str, factory: str, params: dict, reference: Reference,
                 k: int, distances: np.ndarray, predictions: np.ndarray, times: list[float],
                 latency: dict, build_seconds: float, index_mb: float | None,
                 confidence: np.ndarray | None = None) -> dict:
    """One result row: quality against the reference, speed, and cost (and each
    prediction's confidence, where the row has one)."""
    median = statistics.median(times)
    return {"index": name, "kind": kind, "factory": factory, "space": reference.space,
            "params": params, "k": k, "exact_accuracy": reference.exact_accuracy,
            "recall": recall(distances, reference.truth.distances, k),
            "accuracy": accuracy(predictions, reference.labels),
            "agreement": accuracy(predictions, reference.exact_predictions),
            "batch_median_s": median, "batch_best_s": min(times), "batch_runs": len(times),
            "queries_per_second": len(reference.queries) / median, **latency,
            "build_seconds": build_seconds, "index_mb": index_mb, "memory_mb": None,
            "default": "",
            **dict.fromkeys(CERTIFIED_COLUMNS),
            "peak_memory_mb": peak_memory_mb(), "predictions": predictions,
            "confidence": confidence}


def measure(searcher: Searcher, labels: np.ndarray, params: dict, reference: Reference,
            settings: SweepSettings) -> tuple[object, list[float], dict]:
    """Time one setting of a searcher: the batch (all threads) and single queries (one)."""
    k = reference.k or settings.k
    batch = Classifier(searcher, labels, k=k, params=params, threads=settings.threads)
    single = Classifier(searcher, labels, k=k, params=params, threads=1)
    result, times = time_batch(lambda: batch.classify(reference.queries),
                               lambda: batch.classify(reference.queries[:WARM_UP_QUERIES]),
                               settings.repeats, settings.batch_budget_seconds)
    latency = time_single_queries(single.classify, reference.latency_sample,
                                  settings.latency_budget_seconds)
    return result, times, latency


def searcher_of(collection: Collection, name: str, cluster: Cluster | None = None) -> Searcher:
    """Index `name`'s searcher; a sharded index's shards searched on `cluster` when given."""
    if cluster is not None and int(collection.indexes[name].get("shards", 1)) > 1:
        return cluster.searcher(collection, name)
    return collection.searcher(name)


def sweep_index(collection: Collection, name: str, reference: Reference,
                settings: SweepSettings, bar: ProgressBar, log: Log = silent,
                cluster: Cluster | None = None) -> list[dict]:
    """Measure one index at every point of its (focused or full) search grid.

    A grid over one parameter (efSearch, nprobe) stops once a setting finds every exact
    neighbour of every query: larger settings search more and can only be slower.
    """
    entry = collection.indexes[name]
    searcher = searcher_of(collection, name, cluster)
    labels = collection.train().labels
    grid = settings.grid(entry)
    defaults = searcher.parameters()
    points = grid_points(grid)
    shown = {name: defaults[name] for name in grid if name in defaults}
    if not settings.full and len(shown) == len(grid) and shown not in points:
        points.append(shown)  # the setting `query` uses is always measured
    certified = bool(entry.get("certified"))
    rows: list[dict] = []
    for position, params in enumerate(points):
        result, times, latency = measure(searcher, labels, params, reference, settings)
        rows.append(measured_row(
            name, "mnist-ann", entry["factory"], result.params, reference, result.k,
            comparable_distances(searcher, entry, reference.queries, result.neighbours,
                                 settings.threads),
            result.predictions, times, latency,
            entry["build_seconds"], entry["bytes"] / 1e6, result.confidence))
        rows[-1].update({key: result.stats.get(key) for key in CERTIFIED_COLUMNS})
        rows[-1]["memory_mb"] = resident_bytes(entry, searcher.ntotal) / 1e6
        if result.params == defaults:  # the setting `query` uses when not told otherwise
            rows[-1]["default"] = "tuned" if "tuned" in entry else "recipe"
        bar.update(1)
        exact_already = rows[-1]["recall"] == 1.0 and not certified  # always 1 there
        if len(grid) == 1 and exact_already and position + 1 < len(points):
            log(f"{name}: {format_params(result.params)} already returns the exact "
                f"neighbours; the {len(points) - position - 1} larger settings are skipped")
            bar.update(len(points) - position - 1)
            break
    return rows


def comparable_distances(searcher: Searcher, entry: dict, queries: np.ndarray,
                         found: Neighbours, threads: int | None = None) -> np.ndarray:
    """The distances of the found neighbours in the reference's terms: a re-ranked index
    answers gated queries with the candidate stage's distances, so its neighbours are
    measured by the re-rank distance again."""
    if not entry.get("rerank"):
        return found.distances
    with faiss_threads(threads):
        return searcher.pool_distances(queries, found.rows)


def reference_for(collection: Collection, name: str, pixels: Reference,
                  settings: SweepSettings, log: Log, cluster: Cluster | None = None) -> Reference:
    """The reference for index `name`: the pixel one, exact search in its own space, or for
    a re-ranked index the exact re-rank of its largest candidate pool (at its own k)."""
    k, threads = settings.k, settings.threads
    searcher = searcher_of(collection, name, cluster)
    if collection.indexes[name].get("rerank"):
        return rerank_reference(collection, name, pixels, settings, log)
    if searcher.space.key == "pixels":
        return pixels
    truth = ground_truth(collection, name, k, threads, log, pixels.rows)
    exact = Classifier(collection.exact_searcher(name), collection.train().labels, k=k)
    return dataclasses.replace(pixels, truth=truth, exact_predictions=exact.votes(truth),
                               space=searcher.space.description)


def rerank_reference(collection: Collection, name: str, pixels: Reference,
                     settings: SweepSettings, log: Log) -> Reference:
    """A re-ranked index is measured at its own k (chosen with its pool and gate) against
    the exact re-rank of the largest pool it is swept at: recall then counts what the gate
    and smaller pools lose."""
    searcher = collection.searcher(name)
    k = int(getattr(searcher, "default_k", None) or settings.k)
    pool = max([*settings.grid(collection.indexes[name]).get("pool", []),
                searcher.parameters()["pool"]])  # the default is measured too
    log(f"{name}: exact {searcher.stats_name.upper()} re-rank of the {pool} nearest "
        f"candidates of {len(pixels.queries):,} queries, k={k}")
    truth = rerank_pool_truth(searcher, pixels.queries, k, pool, settings.threads)
    exact = Classifier(searcher, collection.train().labels, k=k)
    return dataclasses.replace(
        pixels, truth=truth, exact_predictions=exact.votes(truth), k=k,
        space=f"{searcher.stats_name.upper()} re-rank of {pool} candidates, k={k}")


def whole_set_check(collection: Collection, name: str, reference: Reference,
                    settings: SweepSettings, log: Log) -> dict:
    """A re-ranked index on a seeded sample of queries against the exact ranking by its
    re-rank distance over the whole training set: the recall of its default setting, and
    of the exact re-rank of its candidate pool."""
    searcher = collection.searcher(name)
    count = min(settings.whole_set_queries, len(reference.queries))
    sample = np.sort(np.random.default_rng(2).choice(len(reference.queries), count,
                                                     replace=False))
    queries, k = reference.queries[sample], reference.k or settings.k
    log(f"{name}: exact {searcher.stats_name.upper()} over all {searcher.ntotal:,} training "
        f"rows for {count} sampled queries ({count * searcher.ntotal:,} comparisons)")
    whole = rerank_whole_set_truth(searcher, queries, k, settings.threads)
    with faiss_threads(settings.threads):
        found = searcher.search(queries, k)
    distances = comparable_distances(searcher, collection.indexes[name], queries, found,
                                     settings.threads)
    pool = reference.truth.take(sample)
    return {"index": name, "queries": count, "k": k,
            "recall_default": recall(distances, whole.distances, k),
            "recall_pool": recall(pool.distances, whole.distances, k),
            "pool": reference.space}


def rejection_points(rows: list[dict], labels: np.ndarray) -> list[dict]:
    """Per index, at the setting `query` uses (else its most accurate): the fewest
    rejections that bring the error on accepted queries to REJECTION_MAX_ERROR."""
    points = []
    for name in dict.fromkeys(row["index"] for row in rows if row["confidence"] is not None):
        mine = [row for row in rows if row["index"] == name and row["confidence"] is not None]
        row = next((r for r in mine if r["default"]), max(mine, key=lambda r: r["accuracy"]))
        found = fewest_rejections(row["confidence"], row["predictions"], labels,
                                  REJECTION_MAX_ERROR)
        points.append({"index": name, "params": format_params(row["params"]), "k": row["k"],
                       "accuracy": row["accuracy"], "max_error": REJECTION_MAX_ERROR,
                       "reject_below": found["reject_below"] if found else None,
                       "coverage": found["coverage"] if found else None,
                       "accepted_error": found["accepted_error"] if found else None})
    return points


# --- summaries -----------------------------------------------------------------------------

def pareto_frontier(rows: list[dict], x: str = "recall", y: str = "queries_per_second",
                    higher_y_is_better: bool = True) -> list[dict]:
    """Rows that no other row beats on both x (higher is better) and y, sorted by x."""
    sign = 1 if higher_y_is_better else -1
    frontier = []
    best_y = -np.inf
    for row in sorted(rows, key=lambda r: (-r[x], -sign * r[y])):
        if sign * row[y] > best_y:
            frontier.append(row)
            best_y = sign * row[y]
    return sorted(frontier, key=lambda r: r[x])


def format_params(params: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in params.items()) or "-"


def operating_points(rows: list[dict]) -> list[dict]:
    """Per index: the fastest setting reaching each recall target, and the fastest whose
    accuracy is within 0.001 of exact search's in the same space."""
    points = []
    for name in dict.fromkeys(row["index"] for row in rows):
        candidates = [row for row in rows if row["index"] == name]
        targets = [(f"recall ≥ {t:g}", lambda r, t=t: r["recall"] >= t) for t in RECALL_TARGETS]
        targets.append((f"accuracy ≥ exact - {ACCURACY_TOLERANCE:g}",
                        lambda r: r["accuracy"] >= r["exact_accuracy"] - ACCURACY_TOLERANCE
                        - 1e-12))
        for label, reached in targets:
            meeting = [row for row in candidates if reached(row)]
            best = max(meeting, key=lambda r: r["queries_per_second"]) if meeting else None
            points.append({"index": name, "target": label,
                           "params": format_params(best["params"]) if best else "not reached",
                           "default": best["default"] if best else "",
                           "recall": best["recall"] if best else None,
                           "accuracy": best["accuracy"] if best else None,
                           "queries_per_second": best["queries_per_second"] if best else None,
                           "p99_ms": best["p99_ms"] if best else None})
    return points


def best_operating_row(rows: list[dict], exact_accuracy: float) -> dict:
    """The fastest row within the accuracy tolerance of exact search (else the most accurate)."""
    close = [r for r in rows
             if r["accuracy"] >= exact_accuracy - ACCURACY_TOLERANCE - 1e-12]
    if close:
        return max(close, key=lambda r: r["queries_per_second"])
    return max(rows, key=lambda r: r["accuracy"])


# --- the whole evaluation ------------------------------------------------------------------

def plan(collection: Collection, index_names: list[str] | None,
         settings: SweepSettings) -> list[str]:
    """The indexes an evaluation sweeps, after checking that it can run at all."""
    names = index_names or list(collection.indexes)
    if "flat" not in collection.indexes:
        raise MnistAnnError(f"collection {collection.name!r} has no flat index, which the "
                            "report needs for ground truth; build it with "
                            "`mnist-ann build --index flat`")
    unknown = [name for name in names if name not in collection.indexes]
    if unknown:
        raise MnistAnnError(f"collection {collection.name!r} has no index "
                            f"{', '.join(map(repr, unknown))} (built: "
                            f"{', '.join(collection.indexes)})")
    if settings.k < 1 or settings.repeats < 1 or settings.latency_queries < 1:
        raise InvalidArgument("k, repeats and latency queries must be at least 1")
    n_test = collection.manifest["rows"]["test"]
    if settings.sample is not None and not 1 <= settings.sample <= n_test:
        raise InvalidArgument(f"the sample must be between 1 and the {n_test:,} test queries, "
                              f"not {settings.sample}")
    return names


@dataclass(frozen=True)
class Evaluation:
    """Every measured row, the operating points, the best row and what it all ran on."""

    rows: list[dict]
    points: list[dict]
    best: dict
    rejections: list[dict]
    rerank_checks: list[dict]
    labels: np.ndarray
    n_classes: int
    meta: dict


def evaluate(collection: Collection, index_names: list[str] | None = None,
             settings: SweepSettings = SweepSettings(), baseline: bool = True,
             peers: bool = True, log: Log = silent,
             progress: Progress = no_progress, cluster: Cluster | None = None) -> Evaluation:
    """Sweep the collection's indexes and the baselines against exact ground truth; with
    `cluster` (cluster.connected), sharded indexes are searched on its workers."""
    from mnist_ann.evaluation import baselines

    started = time.perf_counter()
    names = plan(collection, index_names, settings)
    test = collection.test()
    if test.labels is None:
        raise MnistAnnError(f"{collection.name}: the test table has no labels")
    train_labels = collection.train().labels
    measured = (None if settings.sample is None or settings.sample == len(test) else
                np.sort(np.random.default_rng(1).choice(len(test), settings.sample,
                                                        replace=False)))
    queries = test.pixels if measured is None else test.pixels[measured]
    labels = test.labels if measured is None else test.labels[measured]
    truth = ground_truth(collection, "flat", settings.k, settings.threads, log, measured)
    flat = Classifier(collection.searcher("flat"), train_labels, k=settings.k)
    sample = np.random.default_rng(0).choice(len(queries), min(settings.latency_queries,
                                                               len(queries)), replace=False)
    reference = Reference(queries, labels, truth, flat.votes(truth),
                          queries[np.sort(sample)], rows=measured)
    rows: list[dict] = []
    rerank_checks: list[dict] = []
    for name in names:
        points = len(grid_points(settings.grid(collection.indexes[name])))
        log(f"sweeping {name} ({points} settings)")
        own = reference_for(collection, name, reference, settings, log, cluster)
        with progress(f"{name}", points) as bar:
            rows += sweep_index(collection, name, own, settings, bar, log, cluster)
        if collection.indexes[name].get("rerank") and settings.whole_set_queries:
            rerank_checks.append(whole_set_check(collection, name, own, settings, log))
    if baseline:
        rows.append(baselines.sklearn_row(collection, reference, settings, log))
    if peers and baselines.hnswlib_available():
        hnsw = settings.grid(collection.indexes["hnsw"]) if "hnsw" in collection.indexes else {}
        grid = hnsw.get("efSearch") or baselines.HNSWLIB_EF
        rows += baselines.hnswlib_rows(collection, reference, settings, grid, log, progress)
    elif peers:
        log("peer: hnswlib is not installed (pip install '.[peers]'); no peer curve")
    if peers:
        rows += baselines.panorama_rows(collection, reference, settings, log, progress)
    exact_accuracy = reference.exact_accuracy
    points = operating_points(rows)
    best = best_operating_row(rows, exact_accuracy)
    meta = {"collection": collection.name, "split": collection.manifest["split"],
            "rows": collection.manifest["rows"],
            "fingerprint": collection.manifest["dataset"]["fingerprint"], "k": settings.k,
            "exact_accuracy": exact_accuracy, "machine": describe_machine(),
            "settings": {"threads": settings.threads, "repeats": settings.repeats,
                         "latency_queries": len(sample), "full": settings.full,
                         "queries": len(queries), "method": settings.describe(),
                         "on_cluster": [] if cluster is None else [
                             name for name in names
                             if int(collection.indexes[name].get("shards", 1)) > 1]},
            "best": f"{best['index']} {format_params(best['params'])} (accuracy "
                    f"{best['accuracy']:.4f}, {best['queries_per_second']:,.0f} queries/s)",
            "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "seconds": time.perf_counter() - started}
    return Evaluation(rows, points, best, rejection_points(rows, labels), rerank_checks,
                      labels, len(flat.classes), meta)

