"""The report: sweep figures recomputed from raw neighbours, output files, the HTML page."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import writable_copy
from helpers import (
    assert_clean_error,
    browser_path,
    clustered_digits,
    exact_knn,
    make_collection,
    pair_distances,
    run_cli,
)
from hypothesis import given
from hypothesis import strategies as st

from mnist_ann.api import Collection
from mnist_ann.classify import vote
from mnist_ann.evaluation.sweep import pareto_frontier
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import resolve_recipe

OUTPUTS = ["results.csv", "results.json", "recall_vs_qps.png", "accuracy_vs_latency.png",
           "risk_coverage.png", "accuracy_vs_size.png", "confusion.png", "report.html",
           "report.md"]


@pytest.fixture(scope="module")
def small(shared, tmp_path_factory: pytest.TempPathFactory) -> Collection:
    """A copy of the shared label-noise collection: the report caches its ground truth
    there."""
    return writable_copy(shared("small"), tmp_path_factory.mktemp("report-store"))


@pytest.fixture(scope="module")
def report(small: Collection, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("report")
    args = ["report", "--store", small.root.parent, "--collection", "small", "--out", out,
            "--repeats", "1", "--latency-queries", "20", "--threads", "2", "--full"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    args[args.index(out)] = tmp_path_factory.mktemp("again")
    again = run_cli(*args, "--index", "hnsw", "--no-baseline", "--no-peers", "--json")
    return {"out": out, "rows": rows, "stdout": result.stdout, "stderr": result.stderr,
            "again": again}


def test_every_output_file_is_written(report: dict) -> None:
    for name in OUTPUTS:
        assert (report["out"] / name).stat().st_size > 0, name
    for name in OUTPUTS:
        if name.endswith(".png"):
            assert (report["out"] / name).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((report["out"] / "results.json").read_text())
    assert len(results["results"]) == len(report["rows"])
    meta = results["meta"]
    assert meta["machine"]["faiss_simd"] and meta["machine"]["cpu"]
    assert meta["settings"]["threads"] == 2 and meta["k"] == 7
    markdown = (report["out"] / "report.md").read_text()
    for fragment in ("## Operating points", "fingerprint", "recall_vs_qps.png", "threads"):
        assert fragment in markdown
    assert "recall ≥ 0.99" in report["stdout"]


def test_rows_cover_every_grid_point_and_the_baselines(report: dict, small: Collection) -> None:
    by_index: dict[str, list[dict]] = {}
    for row in report["rows"]:
        by_index.setdefault(row["index"], []).append(row)
    assert len(by_index["flat"]) == 1
    for name, parameter in (("ivf", "nprobe"), ("hnsw", "efSearch")):
        grid = small.indexes[name]["search_grid"][parameter]
        swept = [json.loads(r["params"])[parameter] for r in by_index[name]]
        recalls = [float(r["recall"]) for r in by_index[name]]
        assert swept == grid[:len(swept)]
        # the sweep stops exactly at the first setting that is exact for every query
        assert all(value < 1.0 for value in recalls[:-1])
        assert len(swept) == len(grid) or recalls[-1] == 1.0
    assert len(by_index["scikit-learn"]) == 1
    from mnist_ann.store.collection import resident_bytes

    for name, rows in by_index.items():  # the size plot's x: what the index needs in memory
        entry = small.indexes.get(name)
        expected = (f"{resident_bytes(entry, len(small.train())) / 1e6}" if entry else "")
        assert {row["memory_mb"] for row in rows} == {expected}, name
    try:
        import hnswlib  # noqa: F401
    except ImportError:
        assert "hnswlib" not in by_index
    else:
        assert len(by_index["hnswlib"]) == len(small.indexes["hnsw"]["search_grid"]["efSearch"])
    from mnist_ann.evaluation.baselines import PANORAMA_GRID

    assert [(json.loads(r["params"])["levels"], json.loads(r["params"])["batch_size"])
            for r in by_index["faiss-panorama"]] == PANORAMA_GRID


def test_recall_and_accuracy_recomputed_from_raw_neighbours(report: dict,
                                                            small: Collection) -> None:
    train, test = small.train(), small.test()
    true_distances, true_rows = exact_knn(train.pixels, test.pixels, 7)
    exact_votes = [np.bincount(train.labels[row], minlength=10).argmax() for row in true_rows]
    exact_accuracy = np.mean(np.array(exact_votes) == test.labels)
    for row in report["rows"]:
        if row["index"] in ("flat", "ivf", "hnsw"):
            found = small.searcher(row["index"]).search(test.pixels, 7,
                                                        json.loads(row["params"]))
            distances = pair_distances(train.pixels, test.pixels, found.rows)  # inf where -1
            recall = np.mean(distances <= true_distances[:, -1:])
            votes = [np.bincount(train.labels[r[r >= 0]], minlength=10).argmax()
                     for r in found.rows]
            accuracy = np.mean(np.array(votes) == test.labels)
            agreement = np.mean(np.array(votes) == np.array(exact_votes))
            assert float(row["recall"]) == pytest.approx(recall, abs=1e-12), row
            assert float(row["accuracy"]) == pytest.approx(accuracy, abs=1e-12), row
            assert float(row["agreement"]) == pytest.approx(agreement, abs=1e-12), row
        if row["index"] in ("flat", "scikit-learn", "faiss-panorama"):
            assert float(row["recall"]) == 1.0
            assert float(row["accuracy"]) == pytest.approx(exact_accuracy, abs=1e-12)
        assert float(row["queries_per_second"]) > 0
        assert float(row["p50_ms"]) <= float(row["p95_ms"]) <= float(row["p99_ms"])


def test_pipeline_rows_are_measured_in_their_own_space(report: dict, small: Collection) -> None:
    knn = small.searcher("deskew-pca-hnsw")
    train_features = knn.space.features.astype(np.float64)
    queries = knn.space.embed(small.test().pixels).astype(np.float64)
    all_distances = ((queries[:, None, :] - train_features[None]) ** 2).sum(-1)
    true_rows = np.argsort(all_distances, axis=1, kind="stable")[:, :7]
    true_kth = np.take_along_axis(all_distances, true_rows, 1)[:, -1:]
    exact_votes = vote(small.train().labels[true_rows].astype(np.int16), None, np.arange(10))
    rows = [row for row in report["rows"] if row["index"] == "deskew-pca-hnsw"]
    assert rows and all(row["space"] == "deskew → L2norm → PCA48" for row in rows)
    for row in rows:
        found = knn.search(small.test().pixels, 7, json.loads(row["params"]))
        distances = np.take_along_axis(all_distances, found.rows, 1)
        assert float(row["recall"]) == pytest.approx(
            np.mean(distances <= true_kth * (1 + 1e-5)), abs=1e-12)
        assert float(row["exact_accuracy"]) == pytest.approx(
            np.mean(exact_votes == small.test().labels), abs=1e-12)
    cached = f"truth-k7-deskew-{small.indexes['deskew-pca-hnsw']['sha256'][:12]}.parquet"
    assert cached in json.loads((small.root / "manifest.json").read_text())["files"]


def test_certified_rows_are_exact_at_every_setting(report: dict, small: Collection) -> None:
    knn = small.searcher("exact-pca")
    rows = [row for row in report["rows"] if row["index"] == "exact-pca"]
    settings = [json.loads(row["params"])["components"] for row in rows]
    assert settings == small.indexes["exact-pca"]["search_grid"]["components"]
    flat = next(row for row in report["rows"] if row["index"] == "flat")
    for row in rows:
        assert float(row["recall"]) == 1.0 and row["accuracy"] == flat["accuracy"]
        stats = knn.search(small.test().pixels, 7, json.loads(row["params"])).stats
        for column in ("lists_scanned_median", "verified_median", "verified_p99",
                       "fallback_queries"):
            assert float(row[column]) == pytest.approx(stats[column])


def test_operating_points_are_the_fastest_meeting_each_target(report: dict) -> None:
    points = json.loads((report["out"] / "results.json").read_text())["operating_points"]
    rows = report["rows"]
    for point in points:
        if not point["target"].startswith("recall"):
            continue
        target = float(point["target"].split("≥")[1])
        meeting = [r for r in rows if r["index"] == point["index"]
                   and float(r["recall"]) >= target]
        if not meeting:
            assert point["params"] == "not reached"
            continue
        fastest = max(meeting, key=lambda r: float(r["queries_per_second"]))
        assert point["queries_per_second"] == pytest.approx(float(fastest["queries_per_second"]))


def test_ground_truth_is_cached_in_the_collection(report: dict, small: Collection) -> None:
    assert "computing exact ground truth" in report["stderr"]
    assert report["again"].exit_code == 0, report["again"].stderr
    assert "computing exact ground truth" not in report["again"].stderr
    manifest = json.loads((small.root / "manifest.json").read_text())
    assert "truth-k7.parquet" in manifest["files"]
    summary = json.loads(report["again"].stdout)
    assert {p["index"] for p in summary["operating_points"]} == {"hnsw"}


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(1, 1e6)), min_size=1, max_size=30))
def test_pareto_frontier_keeps_exactly_the_undominated(points: list) -> None:
    rows = [{"recall": r, "queries_per_second": q} for r, q in points]
    frontier = pareto_frontier(rows)
    for row in rows:
        dominated = any(o["recall"] >= row["recall"] and o["queries_per_second"] >=
                        row["queries_per_second"] and (o["recall"], o["queries_per_second"])
                        != (row["recall"], row["queries_per_second"]) for o in rows)
        on_frontier = any(f is row for f in frontier)
        assert not (dominated and on_frontier)
        if not dominated:
            assert any((f["recall"], f["queries_per_second"]) ==
                       (row["recall"], row["queries_per_second"]) for f in frontier)


def test_report_bad_input(small: Collection, tmp_path: Path) -> None:
    store = small.root.parent
    assert_clean_error(run_cli("report", "--store", store, "--collection", "small", "--index",
                               "annoy", "--out", tmp_path / "r"), 1, "no index 'annoy'")
    assert not (tmp_path / "r").exists()
    assert_clean_error(run_cli("report", "--store", store, "--collection", "nosuch", "--out",
                               tmp_path / "r"), 1, "no collection 'nosuch'")
    (tmp_path / "file").write_text("")
    assert_clean_error(run_cli("report", "--store", store, "--collection", "small", "--out",
                               tmp_path / "file" / "r"), 1, "not writable")


def test_report_needs_a_flat_index(isolated: Path) -> None:
    images, labels = clustered_digits(500, seed=2)
    collection = make_collection(isolated / "store", "noflat", images, labels)
    build_indexes(collection, [resolve_recipe("hnsw", 450)], threads=1)
    assert_clean_error(run_cli("report", "--collection", "noflat", "--out", isolated / "r"), 1,
                       "has no flat index")


# --- the page in a real browser -------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000", "--dump-dom"]


def test_report_html_images_load_in_chromium(report: dict, tmp_path: Path) -> None:
    chromium = browser_path()
    page = (report["out"] / "report.html").read_text()
    probe = ("<script>window.addEventListener('load', () => { const images = "
             "[...document.images]; document.body.dataset.images = images.length + '/' + "
             "images.filter(i => i.complete && i.naturalWidth > 0).length; });</script>")
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", probe + "</body>"))
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           checked.as_uri()], capture_output=True, text=True, timeout=120,
                          check=False)
    match = re.search(r'data-images="(\d+)/(\d+)"', done.stdout)
    assert match, done.stderr[-2000:]
    total, loaded = map(int, match.groups())
    assert total == 5 and loaded == 5  # recall, latency, risk-coverage, size, confusion
