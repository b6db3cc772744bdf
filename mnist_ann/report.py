"""Parameter sweeps, baselines, operating points, and the report files (CSV, JSON, plots, HTML)."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnist_ann.build import ProgressBar, no_progress, set_threads
from mnist_ann.errors import InvalidArgument, MnistAnnError
from mnist_ann.fileio import atomic_path, write_json
from mnist_ann.machine import describe_machine, peak_memory_mb
from mnist_ann.metrics import accuracy, confusion_matrix, latency_summary, recall, vote
from mnist_ann.search import KnnIndex, Neighbours, exact_distances, order_exactly
from mnist_ann.store import Collection, ensure_writable

RECALL_TARGETS = (0.90, 0.95, 0.99, 0.999)
MIN_LATENCY_QUERIES = 30
RECALL_PLOT_CEILING = 0.9999
WARM_UP_QUERIES = 500
ACCURACY_TOLERANCE = 0.001
SKLEARN_ROW = "scikit-learn"
HNSWLIB_ROW = "hnswlib"
HNSWLIB_BUILD = {"M": 16, "ef_construction": 200}
# certified-exact indexes: lists scanned and rows verified per query, queries scanning all lists
CERTIFIED_COLUMNS = ["lists_scanned_median", "verified_median", "verified_p99", "fallback_queries"]

Log = Callable[[str], None]
Progress = Callable[[str, int], ProgressBar]


@dataclass(frozen=True)
class SweepSettings:
    """How to measure: k, repeats of the batch run, queries timed one at a time, threads."""

    k: int = 7
    repeats: int = 3
    latency_queries: int = 300
    threads: int = 2
    batch_budget_seconds: float = 5.0
    latency_budget_seconds: float = 2.0

    def describe(self) -> str:
        return (f"batch: all queries in one call with {self.threads} threads, after a warm-up "
                f"on {WARM_UP_QUERIES} queries, median of {self.repeats} runs (fewer, at "
                f"least 1, once {self.batch_budget_seconds:g} s are spent: see batch_runs); "
                f"latency: up to {self.latency_queries} queries one at a time with 1 thread "
                f"(at least {MIN_LATENCY_QUERIES}, fewer once {self.latency_budget_seconds:g} "
                "s are spent: see latency_queries), percentiles of the per-query wall time "
                "(search, exact re-rank and vote); a one-parameter grid stops at the first "
                "setting that returns the exact neighbours for every query (larger settings "
                "only search more)")


# --- ground truth --------------------------------------------------------------------------

def ground_truth(knn: KnnIndex, k: int, threads: int, log: Log) -> Neighbours:
    """Exact neighbours of the test queries in `knn`'s ranking space, cached in the collection.

    Pass the flat index for the pixel space; any index of another space gives its own.
    """
    collection = knn.collection
    key = knn.space_key
    filename = f"truth-k{k}.parquet" if key == "pixels" else f"truth-k{k}-{key}.parquet"
    if filename in collection.manifest["files"]:
        table = pq.read_table(collection.verified(filename))
        distances = table.column("distances")
        kind = np.int64 if pa.types.is_integer(distances.type.value_type) else np.float64
        return Neighbours(np.array(table.column("rows").to_pylist(), dtype=np.int64),
                          np.array(distances.to_pylist(), dtype=kind))
    log(f"computing exact ground truth (k={k}) in the {knn.space} space; cached as {filename}")
    set_threads(threads)
    truth = knn.exact_search(collection.test().pixels, k)
    value_type = pa.int64() if truth.distances.dtype.kind == "i" else pa.float64()
    table = pa.table({"rows": pa.array(list(truth.rows), pa.list_(pa.int64())),
                      "distances": pa.array(list(truth.distances), pa.list_(value_type))})
    with atomic_path(collection.root / filename) as tmp:
        pq.write_table(table, tmp)
    collection.record_file(filename)
    collection.save()
    return truth


def reference_in_space(knn: KnnIndex, pixels: Reference, settings: SweepSettings,
                       log: Log) -> Reference:
    """The reference for `knn`: the pixel one, or exact search in its own ranking space."""
    if knn.space_key == "pixels":
        return pixels
    truth = ground_truth(knn, settings.k, settings.threads, log)
    return dataclasses.replace(pixels, truth=truth, exact_predictions=knn.votes(truth),
                               space=knn.space)


# --- timing --------------------------------------------------------------------------------

def time_batch(run: Callable[[], object], warm_up: Callable[[], object], repeats: int,
               budget_seconds: float) -> tuple[object, list[float]]:
    """Result of `run` and the wall times of up to `repeats` runs after a warm-up.

    Runs stop early once `budget_seconds` are spent (at least one always runs), so that slow
    settings such as nprobe = nlist do not take the whole report's time.
    """
    warm_up()
    times: list[float] = []
    result = None
    while len(times) < repeats and (not times or sum(times) < budget_seconds):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return result, times


def time_single_queries(run_one: Callable[[np.ndarray], object], queries: np.ndarray,
                        budget_seconds: float) -> dict:
    """Per-query latency percentiles, one query at a time, after a short warm-up.

    Stops early once `budget_seconds` are spent, after at least MIN_LATENCY_QUERIES queries.
    """
    for query in queries[:5]:
        run_one(query[None, :])
    seconds = []
    spent = 0.0
    for query in queries:
        started = time.perf_counter()
        run_one(query[None, :])
        seconds.append(time.perf_counter() - started)
        spent += seconds[-1]
        if spent > budget_seconds and len(seconds) >= MIN_LATENCY_QUERIES:
            break
    return {**latency_summary(np.array(seconds)), "latency_queries": len(seconds)}


# --- sweeps --------------------------------------------------------------------------------

def grid_points(search_grid: dict) -> list[dict]:
    """Every combination of the grid's values ({} for an index without search parameters)."""
    names = sorted(search_grid)
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(search_grid[name] for name in names))]


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

    @property
    def exact_accuracy(self) -> float:
        return accuracy(self.exact_predictions, self.labels)


def measured_row(name: str, kind: str, factory: str, params: dict, reference: Reference,
                 k: int, distances: np.ndarray, predictions: np.ndarray, times: list[float],
                 latency: dict, build_seconds: float, index_mb: float | None) -> dict:
    """One result row: quality against the reference, speed, and cost."""
    median = statistics.median(times)
    return {"index": name, "kind": kind, "factory": factory, "space": reference.space,
            "params": params, "k": k, "exact_accuracy": reference.exact_accuracy,
            "recall": recall(distances, reference.truth.distances, k),
            "accuracy": accuracy(predictions, reference.labels),
            "agreement": accuracy(predictions, reference.exact_predictions),
            "batch_median_s": median, "batch_best_s": min(times), "batch_runs": len(times),
            "queries_per_second": len(reference.queries) / median, **latency,
            "build_seconds": build_seconds, "index_mb": index_mb, "default": "",
            **dict.fromkeys(CERTIFIED_COLUMNS),
            "peak_memory_mb": peak_memory_mb(), "predictions": predictions.astype(np.uint8)}


def sweep_index(knn: KnnIndex, reference: Reference, settings: SweepSettings,
                bar: ProgressBar, log: Log) -> list[dict]:
    """Measure one index at every point of its recipe's search grid.

    A grid over one parameter (efSearch, nprobe) stops once a setting finds every exact
    neighbour of every query: larger settings search more and can only be slower.
    """
    grid = knn.entry.get("search_grid", {})
    points = grid_points(grid)
    defaults = knn.parameters()
    rows: list[dict] = []
    for position, params in enumerate(points):
        def run(queries: np.ndarray = reference.queries, params: dict = params) -> object:
            return knn.classify(queries, settings.k, params, threads=settings.threads)

        result, times = time_batch(run, lambda: run(reference.queries[:WARM_UP_QUERIES]),
                                   settings.repeats, settings.batch_budget_seconds)
        latency = time_single_queries(
            lambda query, params=params: knn.classify(query, settings.k, params, threads=1),
            reference.latency_sample, settings.latency_budget_seconds)
        rows.append(measured_row(
            knn.name, "mnist-ann", knn.entry["factory"], result.params, reference, settings.k,
            result.neighbours.distances, result.predictions, times, latency,
            knn.entry["build_seconds"], knn.entry["bytes"] / 1e6))
        rows[-1].update({key: result.stats.get(key) for key in CERTIFIED_COLUMNS})
        if result.params == defaults:  # the setting `query` uses when not told otherwise
            rows[-1]["default"] = "tuned" if "tuned" in knn.entry else "recipe"
        bar.update(1)
        exact_already = rows[-1]["recall"] == 1.0 and not knn.certified  # always 1 there
        if len(grid) == 1 and exact_already and position + 1 < len(points):
            log(f"{knn.name}: {format_params(result.params)} already returns the exact "
                f"neighbours; the {len(points) - position - 1} larger settings are skipped")
            bar.update(len(points) - position - 1)
            break
    return rows


def sklearn_row(collection: Collection, reference: Reference, settings: SweepSettings,
                log: Log) -> dict:
    """The original study's method: KNeighborsClassifier(n_neighbors=k).predict, measured."""
    from sklearn.neighbors import KNeighborsClassifier
    from threadpoolctl import threadpool_limits

    train = collection.train()
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
    distances = exact_distances(train.pixels, reference.queries, rows)
    return measured_row(SKLEARN_ROW, "baseline",
                        f"KNeighborsClassifier(n_neighbors={settings.k})", {}, reference,
                        settings.k, distances, predictions, [seconds], latency, fit_seconds,
                        None)


def hnswlib_rows(collection: Collection, reference: Reference, settings: SweepSettings,
                 grid: list[int], log: Log, progress: Progress) -> list[dict]:
    """hnswlib as a peer, swept over its ef; its own k results vote, as it returns them."""
    import hnswlib

    train = collection.train()
    log(f"peer: hnswlib {HNSWLIB_BUILD}, building")
    started = time.perf_counter()
    index = hnswlib.Index(space="l2", dim=train.pixels.shape[1])
    index.init_index(max_elements=len(train), **HNSWLIB_BUILD, random_seed=100)
    index.set_num_threads(settings.threads)
    index.add_items(train.pixels.astype(np.float32), np.arange(len(train)))
    build_seconds = time.perf_counter() - started
    classes = np.unique(train.labels)
    queries = reference.queries.astype(np.float32)
    rows = []
    with progress("hnswlib", len(grid)) as bar:
        for ef in grid:
            index.set_ef(max(ef, settings.k))

            def run(data: np.ndarray = queries, threads: int = settings.threads) -> np.ndarray:
                found, _ = index.knn_query(data, k=settings.k, num_threads=threads)
                return found.astype(np.int64)

            found, times = time_batch(run, lambda: run(queries[:WARM_UP_QUERIES]),
                                      settings.repeats, settings.batch_budget_seconds)
            neighbours = order_exactly(
                found, exact_distances(train.pixels, reference.queries, found), settings.k)
            predictions = vote(train.labels[neighbours.rows].astype(np.int16),
                               neighbours.distances, classes)
            latency = time_single_queries(lambda q: run(q.astype(np.float32), 1),
                                          reference.latency_sample,
                                          settings.latency_budget_seconds)
            rows.append(measured_row(
                HNSWLIB_ROW, "peer", f"hnswlib M={HNSWLIB_BUILD['M']} "
                f"efConstruction={HNSWLIB_BUILD['ef_construction']}", {"ef": ef}, reference,
                settings.k, neighbours.distances, predictions, times, latency, build_seconds,
                None))
            bar.update(1)
    return rows


def hnswlib_available() -> bool:
    try:
        import hnswlib  # noqa: F401
    except ImportError:
        return False
    return True


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


def format_params(params: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in params.items()) or "-"


def best_operating_row(rows: list[dict], exact_accuracy: float) -> dict:
    """The fastest row within the accuracy tolerance of exact search (else the most accurate)."""
    close = [r for r in rows
             if r["accuracy"] >= exact_accuracy - ACCURACY_TOLERANCE - 1e-12]
    if close:
        return max(close, key=lambda r: r["queries_per_second"])
    return max(rows, key=lambda r: r["accuracy"])


# --- files ---------------------------------------------------------------------------------

CSV_COLUMNS = ["index", "kind", "factory", "space", "params", "k", "recall", "accuracy",
               "exact_accuracy", "agreement",
               "queries_per_second", "batch_median_s", "batch_best_s", "batch_runs", "p50_ms",
               "p95_ms", "p99_ms", "latency_queries", "build_seconds", "index_mb",
               "peak_memory_mb", "default", *CERTIFIED_COLUMNS]


def public_row(row: dict) -> dict:
    return {column: row[column] for column in CSV_COLUMNS}


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**public_row(row), "params": json.dumps(row["params"])})


def plot_recall_vs_qps(path: Path, rows: list[dict], k: int) -> None:
    from mnist_ann.plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(row["index"] for row in rows):
        mine = [row for row in rows if row["index"] == name]
        frontier = pareto_frontier(mine)
        line, = axis.plot([min(r["recall"], RECALL_PLOT_CEILING) for r in frontier],
                          [r["queries_per_second"] for r in frontier],
                          marker="o", label=name, clip_on=False)
        axis.scatter([min(r["recall"], RECALL_PLOT_CEILING) for r in mine],
                     [r["queries_per_second"] for r in mine],
                     color=line.get_color(), alpha=0.3, s=14, clip_on=False)
    axis.set_yscale("log")
    # logit spreads out the region near recall 1 where the indexes differ
    axis.set_xscale("logit", one_half="1/2")
    axis.set_xlim(right=RECALL_PLOT_CEILING)
    axis.set_xlabel(f"recall@{k} (logit scale; recall 1 drawn at the right edge)")
    axis.set_ylabel("queries per second (batch, log scale)")
    axis.set_title("Recall against throughput: Pareto frontier of each index")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def plot_accuracy_vs_latency(path: Path, rows: list[dict], k: int) -> None:
    from mnist_ann.plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(row["index"] for row in rows):
        mine = [row for row in rows if row["index"] == name]
        frontier = pareto_frontier(mine, "accuracy", "p99_ms", higher_y_is_better=False)
        line, = axis.plot([r["p99_ms"] for r in frontier], [r["accuracy"] for r in frontier],
                          marker="o", label=name)
        axis.scatter([r["p99_ms"] for r in mine], [r["accuracy"] for r in mine],
                     color=line.get_color(), alpha=0.3, s=14)
    exact_by_space = {row["space"]: row["exact_accuracy"] for row in rows}
    for (space, exact), style in zip(exact_by_space.items(), itertools.cycle(["--", ":", "-."]),
                                     strict=False):
        axis.axhline(exact, color="black", linestyle=style, linewidth=1,
                     label=f"exact k={k} vote, {space} ({exact:.4f})")
    axis.set_xscale("log")
    axis.set_xlabel("single-query p99 latency (ms, log scale)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"Accuracy of the k={k} vote against single-query latency (frontiers)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def format_cell(value: object) -> str:
    """A table cell: floats to 4 decimals, or with thousands separators from 100 up."""
    if value is None:
        return ""
    if isinstance(value, float):
        if np.isnan(value):
            return ""
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def html_table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(row[c]))}</td>" for c in columns)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


RESULT_COLUMNS = ["index", "space", "params", "default", "recall", "accuracy", "agreement",
                  "queries_per_second", "p50_ms", "p99_ms", "build_seconds", "index_mb",
                  *CERTIFIED_COLUMNS]
POINT_COLUMNS = ["index", "target", "params", "default", "recall", "accuracy",
                 "queries_per_second", "p99_ms"]
IMAGES = [("recall_vs_qps.png", "Recall against queries per second"),
          ("accuracy_vs_latency.png", "Accuracy against single-query p99 latency"),
          ("confusion.png", "Confusion matrix at the best operating point")]


def write_documents(out: Path, meta: dict, rows: list[dict], points: list[dict]) -> None:
    """report.md (images beside it) and report.html (images embedded)."""
    shown = [{**public_row(r), "params": format_params(r["params"])} for r in rows]
    header = [("machine", f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores"),
              ("threads", f"{meta['settings']['threads']} for batches, 1 for latency"),
              ("faiss", f"{meta['machine']['faiss']} ({meta['machine']['faiss_simd']})"),
              ("numpy / BLAS", f"{meta['machine']['numpy']} / {meta['machine']['blas']}"),
              ("scikit-learn", meta["machine"]["scikit-learn"]),
              ("dataset", f"MNIST-70k, fingerprint {meta['fingerprint']}"),
              ("split", f"{meta['collection']}: {json.dumps(meta['split'])}, "
                        f"{meta['rows']['train']:,} train / {meta['rows']['test']:,} test"),
              ("method", meta["settings"]["method"]),
              ("best operating point", meta["best"])]
    md = [f"# mnist-ann report: {meta['collection']}, k={meta['k']}", "",
          f"Generated {meta['generated']} in {meta['seconds']:.0f} s.", ""]
    md += [f"- **{name}**: {value}" for name, value in header]
    md += ["", "## Operating points", "", markdown_table(points, POINT_COLUMNS), "",
           "## All settings", "", markdown_table(shown, RESULT_COLUMNS), ""]
    md += [item for name, title in IMAGES for item in (f"## {title}", "", f"![{title}]({name})",
                                                       "")]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(md))
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt=\"{html.escape(title)}\" src=\"data:image/png;"
        f"base64,{base64.b64encode((out / name).read_bytes()).decode()}\">"
        for name, title in IMAGES)
    items = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(str(v))}</li>" for n, v in header)
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>mnist-ann report: "
            f"{html.escape(meta['collection'])}</title><style>body{{font-family:sans-serif;"
            "max-width:1100px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
            f"</style></head><body><h1>mnist-ann report: {html.escape(meta['collection'])}, "
            f"k={meta['k']}</h1><ul>{items}</ul><h2>Operating points</h2>"
            f"{html_table(points, POINT_COLUMNS)}<h2>All settings</h2>"
            f"{html_table(shown, RESULT_COLUMNS)}{images}</body></html>")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(page)


# --- the whole report ----------------------------------------------------------------------

@dataclass(frozen=True)
class Report:
    out: Path
    rows: list[dict]
    points: list[dict]
    meta: dict


def run_report(collection: Collection, out: Path, index_names: list[str] | None = None,
               settings: SweepSettings = SweepSettings(), baseline: bool = True,
               peers: bool = True, log: Log = lambda message: None,
               progress: Progress = no_progress) -> Report:
    """Sweep the collection's indexes and the baselines, and write every report file."""
    started = time.perf_counter()
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
    ensure_writable(out)
    test = collection.test()
    if test.labels is None:
        raise MnistAnnError(f"{collection.name}: the test table has no labels")
    flat = KnnIndex(collection, "flat")
    truth = ground_truth(flat, settings.k, settings.threads, log)
    sample = np.random.default_rng(0).choice(len(test), min(settings.latency_queries,
                                                            len(test)), replace=False)
    reference = Reference(test.pixels, test.labels, truth, flat.votes(truth),
                          test.pixels[np.sort(sample)])
    rows: list[dict] = []
    for name in names:
        knn = flat if name == "flat" else KnnIndex(collection, name)
        points = len(grid_points(knn.entry.get("search_grid", {})))
        log(f"sweeping {name} ({points} settings)")
        with progress(f"{name}", points) as bar:
            rows += sweep_index(knn, reference_in_space(knn, reference, settings, log),
                                settings, bar, log)
    if baseline:
        rows.append(sklearn_row(collection, reference, settings, log))
    if peers and hnswlib_available():
        hnsw_grid = collection.indexes.get("hnsw", {}).get("search_grid", {}).get("efSearch")
        rows += hnswlib_rows(collection, reference, settings,
                             hnsw_grid or [8, 16, 32, 64, 128, 256, 512], log, progress)
    elif peers:
        log("peer: hnswlib is not installed (pip install '.[peers]'); no peer curve")
    exact_accuracy = reference.exact_accuracy
    points = operating_points(rows)
    best = best_operating_row(rows, exact_accuracy)
    out.mkdir(parents=True, exist_ok=True)
    from mnist_ann.plots import confusion_heatmap

    confusion_heatmap(confusion_matrix(test.labels, best["predictions"], len(flat.classes)),
                      out / "confusion.png",
                      f"{best['index']} {format_params(best['params'])}: accuracy "
                      f"{best['accuracy']:.4f}")
    plot_recall_vs_qps(out / "recall_vs_qps.png", rows, settings.k)
    plot_accuracy_vs_latency(out / "accuracy_vs_latency.png", rows, settings.k)
    meta = {"collection": collection.name, "split": collection.manifest["split"],
            "rows": collection.manifest["rows"],
            "fingerprint": collection.manifest["dataset"]["fingerprint"], "k": settings.k,
            "exact_accuracy": exact_accuracy, "machine": describe_machine(),
            "settings": {"threads": settings.threads, "repeats": settings.repeats,
                         "latency_queries": len(sample), "method": settings.describe()},
            "best": f"{best['index']} {format_params(best['params'])} (accuracy "
                    f"{best['accuracy']:.4f}, {best['queries_per_second']:,.0f} queries/s)",
            "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "seconds": time.perf_counter() - started}
    write_csv(out / "results.csv", rows)
    write_json(out / "results.json", {"meta": meta, "operating_points": points,
                                      "results": [public_row(r) for r in rows]})
    write_documents(out, meta, rows, points)
    return Report(out, rows, points, meta)
