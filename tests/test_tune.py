"""Two-stage recipes and `mnist-ann tune`: exact re-rank over pixels, held-out tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import writable_copy
from helpers import (
    assert_clean_error,
    exact_knn,
    forbid_the_test_set,
    run_cli,
)

from mnist_ann.api import Collection
from mnist_ann.evaluation.metrics import recall
from mnist_ann.evaluation.tune import Target, drop_self, held_out_rows, tune_index
from mnist_ann.index.build import build_in_memory, build_indexes
from mnist_ann.index.factory import make_searcher
from mnist_ann.index.neighbours import MISSING, Neighbours
from mnist_ann.index.recipes import resolve_recipe
from mnist_ann.index.space import FLOAT32_EXACT_LIMIT, RankingSpace, vector_space

SYN = ["--collection", "noisy"]


@pytest.fixture
def built(shared, use_store, isolated: Path) -> Collection:
    """The shared noisy collection (flat, hnsw, pca-hnsw), read-only."""
    return use_store(shared("noisy"))


@pytest.fixture
def writable(built: Collection, tmp_path: Path, use_store) -> Collection:
    """A copy of the noisy collection that a test may tune (the CLI's default store)."""
    return use_store(writable_copy(built, tmp_path / "copy"))


def test_float32_rerank_is_exact_and_falls_back_above_two_to_the_24() -> None:
    rng = np.random.default_rng(3)
    train = (rng.random((500, 784)) < 0.5).astype(np.uint8) * 255  # distances near 2.5e7
    train[:250] //= 8  # and some below 2²⁴
    queries = (rng.random((40, 784)) < 0.5).astype(np.uint8) * 255 // 8
    rows = rng.integers(-1, 500, (40, 30))
    space = RankingSpace("pixels", [], train, lambda q: q)
    integer = space.brute_force(queries, rows)
    fast = space.distances(queries, rows)
    assert (integer[rows >= 0] >= FLOAT32_EXACT_LIMIT).any()
    assert (integer[rows >= 0] < FLOAT32_EXACT_LIMIT).any()
    np.testing.assert_array_equal(fast, integer)
    assert np.all(fast[rows < 0] == MISSING)
    t, q = train.astype(np.int64), queries.astype(np.int64)
    brute = ((q[:, None, :] - t[np.maximum(rows, 0)]) ** 2).sum(-1)
    np.testing.assert_array_equal(integer[rows >= 0], brute[rows >= 0])


def test_two_stage_reranks_its_candidates_exactly_in_pixels(built: Collection) -> None:
    train, test = built.train(), built.test()
    true_distances, true_rows = exact_knn(train.pixels, test.pixels, 7)
    knn = built.searcher("pca-hnsw")
    assert knn.space.description == "pixels"
    recalls = []
    for candidates in (7, 16, 64):
        found = knn.search(test.pixels, 7, {"efSearch": 64, "candidates": candidates})
        t, q = train.pixels.astype(np.int64), test.pixels.astype(np.int64)
        brute = ((q[:, None, :] - t[found.rows]) ** 2).sum(-1)
        np.testing.assert_array_equal(found.distances, brute)  # exact integers in pixels
        assert np.all(np.diff(found.distances, axis=1) >= 0)
        recalls.append(recall(found.distances, true_distances, 7))
    assert recalls[0] < recalls[-1] and recalls[-1] >= 0.99
    everything = knn.search(test.pixels, 7, {"efSearch": 512, "candidates": 512})
    np.testing.assert_array_equal(everything.rows, true_rows)


def test_drop_self_leaves_the_other_neighbours() -> None:
    rows = np.array([[5, 1, 2], [3, 4, 6], [9, 9, 8]])
    found = drop_self(Neighbours(rows, rows * 10), np.array([1, 7, 9]), 2)
    np.testing.assert_array_equal(found.rows, [[5, 2], [3, 4], [9, 8]])
    np.testing.assert_array_equal(found.distances, found.rows * 10)


def test_tuning_never_reads_the_test_set(writable: Collection, monkeypatch) -> None:
    forbid_the_test_set(writable, monkeypatch)
    result = run_cli("tune", *SYN, "--index", "pca-hnsw", "--recall", "0.95", "--held-out",
                     "300", "--repeats", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["chosen"]["recall"] >= 0.95


@pytest.mark.parametrize("target", [Target("recall", 0.97), Target("accuracy", 0.002)])
def test_tuned_setting_meets_its_target_on_the_held_out_rows(writable: Collection,
                                                             target: Target) -> None:
    built = writable
    result = tune_index(built, "pca-hnsw", target, held_out=400, seed=5, repeats=1)
    chosen = result["chosen"]
    assert chosen["meets_target"]
    assert built.classifier("pca-hnsw").effective_params == chosen["params"]  # used at once
    assert all(row["queries_per_second"] <= chosen["queries_per_second"]
               for row in result["measured"] if row["meets_target"])
    # recomputed here, from scratch: the recipe built again without the held-out rows, and
    # brute force over the rows it holds
    train = built.train()
    own = held_out_rows(len(train), 400, 5)
    kept = np.setdiff1d(np.arange(len(train)), own)
    recipe = resolve_recipe("pca-hnsw", len(train))
    copy = make_searcher(recipe, build_in_memory(recipe, train.pixels[kept].astype(np.float32),
                                                 threads=1),  # as tune built it
                         vector_space(train.pixels[kept]))
    true_distances, true_rows = exact_knn(train.pixels[kept], train.pixels[own], 7)
    found = copy.search(train.pixels[own], 7, chosen["params"])
    per_query = (found.distances <= true_distances[:, -1:]).mean(axis=1)
    assert per_query.mean() == pytest.approx(chosen["recall"], abs=1e-12)
    bound = per_query.mean() - 2.326 * per_query.std(ddof=1) / np.sqrt(400)
    assert bound == pytest.approx(chosen["recall_bound"], abs=1e-12)
    labels = train.labels
    votes = np.array([np.bincount(labels[kept][r], minlength=10).argmax() for r in found.rows])
    exact = np.array([np.bincount(labels[kept][r], minlength=10).argmax() for r in true_rows])
    assert np.mean(votes == labels[own]) == pytest.approx(chosen["accuracy"], abs=1e-12)
    if target.kind == "recall":
        assert bound >= target.value
    else:
        gap = (votes == labels[own]).astype(float) - (exact == labels[own])
        assert gap.mean() - 2.326 * gap.std(ddof=1) / np.sqrt(400) >= -target.value - 1e-12


def test_tuned_default_survives_reload_and_is_used_by_query(writable: Collection,
                                                            tmp_path: Path) -> None:
    built = writable
    result = run_cli("tune", *SYN, "--index", "pca-hnsw", "--recall", "0.9", "--held-out",
                     "300", "--repeats", "1")
    assert result.exit_code == 0, result.stderr
    assert "default is now" in result.stdout
    reopened = Collection.open(built.root.parent, "noisy")
    entry = reopened.indexes["pca-hnsw"]
    tuned = entry["tuned"]["params"]
    assert entry["search_defaults"] == tuned and entry["tuned"]["held_out"]["from"] == "train"
    assert entry["recipe_search_defaults"] == {"efSearch": 32, "candidates": 32}
    assert reopened.searcher("pca-hnsw").parameters() == tuned
    query = run_cli("query", *SYN, "--index", "pca-hnsw", "--json")
    assert query.exit_code == 0, query.stderr
    assert json.loads(query.stdout)["params"] == tuned
    report = run_cli("report", *SYN, "--index", "pca-hnsw", "--out", tmp_path / "r",
                     "--repeats", "1", "--latency-queries", "5", "--no-baseline",
                     "--no-peers", "--json")
    assert report.exit_code == 0, report.stderr
    rows = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    marked = [row for row in rows if row["default"] == "tuned"]
    assert len(marked) == 1 and marked[0]["params"] == tuned


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (["--index", "pca-hnsw"], 2, "exactly one target"),
    (["--index", "pca-hnsw", "--recall", "0.9", "--accuracy-within", "0.01"], 2,
     "exactly one target"),
    (["--index", "pca-hnsw", "--recall", "1.5"], 2, "--recall"),
    (["--index", "nope", "--recall", "0.9"], 1, "no index 'nope'"),
    (["--index", "flat", "--recall", "0.9"], 1, "no search parameters"),
    (["--index", "pca-hnsw", "--recall", "0.9", "--held-out", "5000"], 2, "held-out"),
])
def test_bad_tune_arguments(built: Collection, args: list, code: int, fragment: str) -> None:
    before = (built.root / "manifest.json").read_bytes()
    assert_clean_error(run_cli("tune", *SYN, *args), code, fragment)
    assert (built.root / "manifest.json").read_bytes() == before


def test_unreachable_target_leaves_the_manifest_unchanged(writable: Collection) -> None:
    built = writable
    build_indexes(built, [resolve_recipe("coarse=IVF64,PQ2", len(built.train()))], threads=2)
    before = (built.root / "manifest.json").read_bytes()
    result = run_cli("tune", *SYN, "--index", "coarse", "--recall", "1.0", "--held-out",
                     "200", "--repeats", "1")
    assert_clean_error(result, 1, "no setting of index 'coarse' reaches")
    assert (built.root / "manifest.json").read_bytes() == before
