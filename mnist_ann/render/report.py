"""The report's files from an evaluation: CSV, JSON, Markdown, a self-contained HTML page
and the plots."""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
from pathlib import Path

import numpy as np

from mnist_ann.evaluation.metrics import confusion_matrix
from mnist_ann.evaluation.sweep import (
    CERTIFIED_COLUMNS,
    Evaluation,
    format_params,
    pareto_frontier,
)
from mnist_ann.fileio import atomic_path, write_json
from mnist_ann.store.collection import ensure_writable

RECALL_PLOT_CEILING = 0.9999
CSV_COLUMNS = ["index", "kind", "factory", "space", "params", "k", "recall", "accuracy",
               "exact_accuracy", "agreement",
               "queries_per_second", "batch_median_s", "batch_best_s", "batch_runs", "p50_ms",
               "p95_ms", "p99_ms", "latency_queries", "build_seconds", "index_mb",
               "memory_mb", "peak_memory_mb", "default", *CERTIFIED_COLUMNS]
RESULT_COLUMNS = ["index", "space", "params", "default", "recall", "accuracy", "agreement",
                  "queries_per_second", "p50_ms", "p99_ms", "build_seconds", "index_mb",
                  "memory_mb", *CERTIFIED_COLUMNS]
POINT_COLUMNS = ["index", "target", "params", "default", "recall", "accuracy",
                 "queries_per_second", "p99_ms"]
REJECTION_COLUMNS = ["index", "params", "k", "accuracy", "max_error", "reject_below",
                     "coverage", "accepted_error"]
RERANK_COLUMNS = ["index", "queries", "k", "recall_default", "recall_pool", "pool"]
REJECTION_TITLE = "Rejection: the fewest rejections for an error of at most 0.1% on the rest"
RERANK_TITLE = ("Re-ranked indexes against the exact re-rank distance over the whole training "
                "set (sampled queries)")
IMAGES = [("recall_vs_qps.png", "Recall against queries per second"),
          ("accuracy_vs_latency.png", "Accuracy against single-query p99 latency"),
          ("risk_coverage.png", "Error against coverage when the least confident are rejected"),
          ("accuracy_vs_size.png", "Accuracy against the memory an index needs"),
          ("confusion.png", "Confusion matrix at the best operating point")]


def public_row(row: dict) -> dict:
    return {column: row[column] for column in CSV_COLUMNS}


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**public_row(row), "params": json.dumps(row["params"])})


def plot_recall_vs_qps(path: Path, rows: list[dict], k: int) -> None:
    from mnist_ann.render.plots import plt, save_figure

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
    from mnist_ann.render.plots import plt, save_figure

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


def plot_risk_coverage(path: Path, rows: list[dict], labels: np.ndarray,
                       rejections: list[dict]) -> None:
    """Per index, at the setting of its rejection point: the error on accepted queries
    against the share accepted, as the confidence threshold falls."""
    from mnist_ann.evaluation.metrics import risk_coverage
    from mnist_ann.render.plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(8, 5.5))
    for point in rejections:
        row = next(r for r in rows if r["index"] == point["index"]
                   and format_params(r["params"]) == point["params"])
        curve = risk_coverage(row["confidence"], row["predictions"] == labels)
        axis.step(curve["coverage"], curve["error"] * 100, where="post", marker=".",
                  label=f"{point['index']} (k={point['k']})")
    axis.axhline(100 * rejections[0]["max_error"] if rejections else 0.1, color="black",
                 linestyle=":", linewidth=1, label="error target of the rejection point")
    axis.set_yscale("symlog", linthresh=0.1)
    axis.set_xlabel("coverage (share of test queries accepted)")
    axis.set_ylabel("error on accepted queries (%, linear below 0.1)")
    axis.set_title("Risk against coverage: rejecting the least confident predictions")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save_figure(figure, path)


SIZE_TARGETS_MB = (1, 4)  # the small-device budgets (issue 18)


def plot_accuracy_vs_size(path: Path, rows: list[dict], k: int) -> None:
    """Per index, its accuracy at every measured setting against the memory it needs
    (store.collection.resident_bytes); the default setting drawn larger."""
    from mnist_ann.render.plots import plt, save_figure

    figure, axis = plt.subplots(figsize=(8, 5.5))
    for name in dict.fromkeys(row["index"] for row in rows if row.get("memory_mb")):
        mine = [row for row in rows if row["index"] == name]
        best = max(mine, key=lambda r: (bool(r["default"]), r["accuracy"]))
        line, = axis.plot([best["memory_mb"]], [best["accuracy"]], marker="o", markersize=8,
                          linestyle="", label=f"{name} ({best['memory_mb']:,.2f} MB)")
        axis.scatter([r["memory_mb"] for r in mine], [r["accuracy"] for r in mine],
                     color=line.get_color(), alpha=0.3, s=14)
    for size in SIZE_TARGETS_MB:
        axis.axvline(size, color="black", linestyle=":", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("memory needed: index file, labels and the training features it ranks "
                    "with (MB, log scale)")
    axis.set_ylabel(f"accuracy of the k={k} vote")
    axis.set_title("Accuracy against size (dotted: 1 MB and 4 MB; large dot: the default)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
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


def write_documents(out: Path, meta: dict, rows: list[dict], points: list[dict],
                    rejections: list[dict], rerank_checks: list[dict]) -> None:
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
              *([("on a Dask cluster", ", ".join(meta["settings"]["on_cluster"]) + " (their "
                  "shards searched on the workers, merged here; the others in this process)")]
                if meta["settings"].get("on_cluster") else []),
              ("best operating point", meta["best"])]
    md = [f"# mnist-ann report: {meta['collection']}, k={meta['k']}", "",
          f"Generated {meta['generated']} in {meta['seconds']:.0f} s.", ""]
    md += [f"- **{name}**: {value}" for name, value in header]
    tables = [("Operating points", points, POINT_COLUMNS),
              (REJECTION_TITLE, rejections, REJECTION_COLUMNS),
              *([(RERANK_TITLE, rerank_checks, RERANK_COLUMNS)] if rerank_checks else []),
              ("All settings", shown, RESULT_COLUMNS)]
    md += [""]
    for title, table, columns in tables:
        md += [f"## {title}", "", markdown_table(table, columns), ""]
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
            f"k={meta['k']}</h1><ul>{items}</ul>"
            + "".join(f"<h2>{html.escape(title)}</h2>{html_table(table, columns)}"
                      for title, table, columns in tables)
            + f"{images}</body></html>")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(page)


def write_report(out: Path, evaluation: Evaluation) -> None:
    """Every report file for `evaluation` into the folder `out`."""
    from mnist_ann.render.plots import confusion_heatmap

    ensure_writable(out)
    rows, best, meta = evaluation.rows, evaluation.best, evaluation.meta
    confusion_heatmap(confusion_matrix(evaluation.labels, best["predictions"],
                                       evaluation.n_classes), out / "confusion.png",
                      f"{best['index']} {format_params(best['params'])}: accuracy "
                      f"{best['accuracy']:.4f}")
    plot_recall_vs_qps(out / "recall_vs_qps.png", rows, meta["k"])
    plot_accuracy_vs_latency(out / "accuracy_vs_latency.png", rows, meta["k"])
    plot_risk_coverage(out / "risk_coverage.png", rows, evaluation.labels,
                       evaluation.rejections)
    plot_accuracy_vs_size(out / "accuracy_vs_size.png", rows, meta["k"])
    write_csv(out / "results.csv", rows)
    write_json(out / "results.json", {"meta": meta, "operating_points": evaluation.points,
                                      "rejection_points": evaluation.rejections,
                                      "rerank_checks": evaluation.rerank_checks,
                                      "results": [public_row(r) for r in rows]})
    write_documents(out, meta, rows, evaluation.points, evaluation.rejections,
                    evaluation.rerank_checks)
