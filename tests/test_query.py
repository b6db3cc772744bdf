"""The query layer on synthetic data: exact ranking, votes, inputs, outputs, bad input."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import writable_copy
from helpers import (
    assert_clean_error,
    clustered_digits,
    exact_knn,
    idx_bytes,
    make_collection,
    run_cli,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.utils.extmath import weighted_mode

from mnist_ann.api import Collection
from mnist_ann.classify import vote
from mnist_ann.data.tables import Table
from mnist_ann.errors import IntegrityError, InvalidArgument
from mnist_ann.index import searchers
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import resolve_recipe
from mnist_ann.store.collection import write_table

SYN = ["--collection", "syn"]


@pytest.fixture
def built(shared, use_store, isolated: Path) -> Collection:
    """The shared synthetic collection (flat, hnsw, ivf), the CLI's default store."""
    return use_store(shared("syn"))


# --- votes ----------------------------------------------------------------------------------

def reference_uniform_vote(labels: np.ndarray) -> int:
    counts = Counter(labels.tolist())
    best = max(counts.values())
    return min(label for label, count in counts.items() if count == best)


@given(arrays(np.int16, st.tuples(st.integers(1, 30), st.integers(1, 9)),
              elements=st.integers(0, 9)))
def test_uniform_vote_is_a_plurality_with_ties_to_the_smallest(labels: np.ndarray) -> None:
    predicted = vote(labels, np.ones(labels.shape, np.int64), np.arange(10))
    assert predicted.tolist() == [reference_uniform_vote(row) for row in labels]


@given(arrays(np.int16, st.tuples(st.integers(1, 20), st.integers(1, 8)),
              elements=st.integers(0, 4)),
       st.data())
@settings(max_examples=60)
def test_distance_vote_matches_scikit_learns_weighted_mode(labels: np.ndarray, data) -> None:
    distances = data.draw(arrays(np.int64, labels.shape, elements=st.integers(0, 10**6)))
    with np.errstate(divide="ignore"):
        weights = 1.0 / np.sqrt(distances.astype(np.float64))
    inf_rows = np.isinf(weights).any(axis=1)
    weights[inf_rows] = np.isinf(weights[inf_rows])
    expected, _ = weighted_mode(labels, weights, axis=1)
    predicted = vote(labels, distances, np.arange(5), "distance")
    np.testing.assert_array_equal(predicted, expected.ravel().astype(int))


def test_missing_neighbours_do_not_vote() -> None:
    labels = np.array([[3, -1, -1], [-1, 2, 2]])
    assert vote(labels, np.ones((2, 3), np.int64), np.arange(10)).tolist() == [3, 2]


# --- exact ranking --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flat", "hnsw", "ivf"])
def test_search_ranks_exactly_and_matches_brute_force(built: Collection, name: str) -> None:
    train, test = built.train(), built.test()
    found = built.searcher(name).search(test.pixels, 10)
    true_distances, true_rows = exact_knn(train.pixels, test.pixels, 10)
    diffs = train.pixels[found.rows].astype(np.int64) - test.pixels[:, None, :]
    np.testing.assert_array_equal(found.distances, (diffs * diffs).sum(-1))
    assert (np.diff(found.distances, axis=1) >= 0).all()
    if name == "flat":
        np.testing.assert_array_equal(found.rows, true_rows)
        np.testing.assert_array_equal(found.distances, true_distances)
    else:
        recall = np.mean(found.distances <= true_distances[:, -1:])
        assert recall >= 0.95


def test_equal_distances_follow_the_training_row(isolated: Path) -> None:
    rng = np.random.default_rng(9)
    base = rng.integers(0, 200, (1, 784), dtype=np.uint8)
    images = np.repeat(base, 60, axis=0)
    images[::2, 0] += 10  # half the rows at one distance, half at another
    collection = make_collection(isolated / "store", "ties", images, np.arange(60) % 10)
    build_indexes(collection, [resolve_recipe("flat", 54)], threads=1)
    found = collection.searcher("flat").search(base, 20)
    rows_at_zero = found.rows[0][found.distances[0] == 0]
    assert len(rows_at_zero) == 20 and (np.diff(rows_at_zero) > 0).all()
    first_20 = np.flatnonzero(collection.train().pixels[:, 0] == base[0, 0])[:20]
    np.testing.assert_array_equal(found.rows[0], first_20)


def test_float32_near_ties_are_resolved_exactly(isolated: Path, monkeypatch) -> None:
    """Distances near 5e7 collide in float32; the exact re-rank with widening must not."""
    query = np.full((1, 784), 255, np.uint8)
    n = 2000
    images = np.zeros((n, 784), np.uint8)
    # every distance is 50,914,576 or one less: the same number in float32
    images[:, 5] = 254
    images[-3:, 5] = 255  # the three true nearest rows, hidden among 2,000 float32 ties
    collection = make_collection(isolated / "store", "float", images, np.zeros(n, np.uint8),
                                 test_size=0.01)
    build_indexes(collection, [resolve_recipe("flat", len(collection.train()))], threads=1)
    train = collection.train().pixels
    true_distances, true_rows = exact_knn(train, query, 7)
    raw = faiss.read_index(str(collection.root / collection.indexes["flat"]["file"]))
    _, raw_rows = raw.search(query.astype(np.float32), 15)
    assert not set(true_rows[0][:3]) <= set(raw_rows[0])  # float32 alone misses them
    found = collection.searcher("flat").search(query, 7)
    np.testing.assert_array_equal(found.rows, true_rows)
    np.testing.assert_array_equal(found.distances, true_distances)
    # many such queries widen a block at a time (here 2 queries of every row)
    monkeypatch.setattr(searchers, "RERANK_CELLS", 2 * len(train))
    queries = np.concatenate([query, train[:4], query])
    true_distances, true_rows = exact_knn(train, queries, 7)
    found = collection.searcher("flat").search(queries, 7)
    np.testing.assert_array_equal(found.rows, true_rows)
    np.testing.assert_array_equal(found.distances, true_distances)


# --- inputs and outputs ---------------------------------------------------------------------

def test_every_input_format_gives_the_same_predictions(built: Collection, tmp_path: Path) -> None:
    from PIL import Image

    test = built.test()
    pixels, labels = test.pixels[:40], test.labels[:40]
    expected = built.classifier("flat").predict(pixels)
    write_table(tmp_path / "q.parquet", Table(test.ids[:40], labels, pixels))
    write_table(tmp_path / "unlabelled.parquet", Table(test.ids[:40], None, pixels))
    np.save(tmp_path / "flat.npy", pixels)
    np.save(tmp_path / "square.npy", pixels.reshape(-1, 28, 28).astype(np.float64))
    (tmp_path / "images.idx").write_bytes(idx_bytes(pixels.reshape(-1, 28, 28), 2051))
    (tmp_path / "labels.idx").write_bytes(idx_bytes(labels, 2049))
    (tmp_path / "png").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image.reshape(28, 28), mode="L").save(tmp_path / "png" / f"{i:03d}.png")
    inputs = [["--input", tmp_path / "q.parquet"], ["--input", tmp_path / "unlabelled.parquet"],
              ["--input", tmp_path / "flat.npy"], ["--input", tmp_path / "square.npy"],
              ["--input", tmp_path / "images.idx", "--labels", tmp_path / "labels.idx"],
              # the synthetic digits are noise to the eye, not white on black: as they are
              ["--input", tmp_path / "png", "--normalize", "none"]]
    for number, args in enumerate(inputs):
        out = tmp_path / f"out{number}.parquet"
        result = run_cli("query", *SYN, *args, "--output", out, "--json")
        assert result.exit_code == 0, (args, result.stderr)
        summary = json.loads(result.stdout)
        assert summary["n"] == 40
        assert ("accuracy" in summary) == (number in (0, 4))
        table = pq.read_table(out).to_pydict()
        np.testing.assert_array_equal(table["predicted"], expected, err_msg=str(args))
    names = pq.read_table(tmp_path / "out5.parquet").column("query").to_pylist()
    assert names[:2] == ["000.png", "001.png"]


def test_output_rows_carry_mnist_ids_and_exact_distances(built: Collection,
                                                         tmp_path: Path) -> None:
    out_parquet, out_csv = tmp_path / "p.parquet", tmp_path / "p.csv"
    assert run_cli("query", *SYN, "-k", "3", "--output", out_parquet).exit_code == 0
    assert run_cli("query", *SYN, "-k", "3", "--output", out_csv).exit_code == 0
    train, test = built.train(), built.test()
    table = pq.read_table(out_parquet).to_pydict()
    np.testing.assert_array_equal(table["query"], test.ids)
    np.testing.assert_array_equal(table["label"], test.labels)
    by_id = {int(mnist_id): row for row, mnist_id in enumerate(train.ids)}
    for i in range(0, len(test), 50):
        for neighbour, distance in zip(table["neighbors"][i], table["distances"][i],
                                       strict=True):
            diff = train.pixels[by_id[neighbour]].astype(np.int64) - test.pixels[i]
            assert int((diff * diff).sum()) == distance
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["query", "predicted", "label", "confidence", "neighbor_1",
                             "neighbor_2", "neighbor_3", "distance_1", "distance_2",
                             "distance_3"]
    assert [float(r["confidence"]) for r in rows] == pytest.approx(table["confidence"])
    assert [int(r["neighbor_2"]) for r in rows] == [n[1] for n in table["neighbors"]]
    assert [int(r["predicted"]) for r in rows] == table["predicted"]


def test_summary_table_and_json_agree(built: Collection) -> None:
    as_json = json.loads(run_cli("query", *SYN, "--index", "hnsw", "--param", "efSearch=32",
                                 "--threads", "1", "--json").stdout)
    assert as_json["params"] == {"efSearch": 32} and as_json["threads"] == 1
    truth = built.test().labels
    predictions = built.classifier("hnsw", params={"efSearch": 32}).predict(built.test().pixels)
    assert as_json["correct"] == int((predictions == truth).sum())
    text = run_cli("query", *SYN, "--index", "hnsw", "--param", "efSearch=32").stdout
    assert f"correct: {as_json['correct']}" in text and "queries_per_second:" in text


def test_confusion_heatmap_is_written(built: Collection, tmp_path: Path) -> None:
    png = tmp_path / "confusion.png"
    assert run_cli("query", *SYN, "--confusion", png).exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


# --- bad input ------------------------------------------------------------------------------

def assert_no_output(result, tmp_path: Path, code: int, fragment: str) -> None:
    assert_clean_error(result, code, fragment)
    assert not (tmp_path / "out.csv").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda: np.zeros((3, 783), np.uint8), "expected [n, 784]"),
    (lambda: np.full((2, 784), np.nan), "NaN"),
    (lambda: np.full((2, 784), 300.0), "outside 0..255"),
    (lambda: np.full((2, 784), -1), "outside 0..255"),
    (lambda: np.zeros((0, 784), np.uint8), "no images"),
])
def test_bad_npy_inputs(built: Collection, tmp_path: Path, make, fragment: str) -> None:
    np.save(tmp_path / "bad.npy", make())
    result = run_cli("query", *SYN, "--input", tmp_path / "bad.npy", "--output",
                     tmp_path / "out.csv")
    assert_no_output(result, tmp_path, 1, fragment)


def test_parquet_of_the_wrong_width(built: Collection, tmp_path: Path) -> None:
    import pyarrow as pa

    pixels = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(783 * 2, np.uint8)), 783)
    pq.write_table(pa.table({"id": [0, 1], "pixels": pixels}), tmp_path / "narrow.parquet")
    result = run_cli("query", *SYN, "--input", tmp_path / "narrow.parquet", "--output",
                     tmp_path / "out.csv")
    assert_no_output(result, tmp_path, 1, "783 pixels")


@pytest.mark.parametrize(("size", "mode", "normalize", "fragment"), [
    ((28, 27), "L", "none", "must be 28x28"), ((30, 30), "RGB", "none", "must be 28x28"),
    ((28, 28), "L", "auto", "no digit found"), ((200, 160), "RGB", "photo", "no digit found"),
])
def test_images_that_cannot_be_queried(built: Collection, tmp_path: Path, size, mode,
                                       normalize: str, fragment: str) -> None:
    from PIL import Image

    (tmp_path / "png").mkdir()
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "png" / "a.png")
    Image.new(mode, size).save(tmp_path / "png" / "b.png")
    result = run_cli("query", *SYN, "--input", tmp_path / "png", "--normalize", normalize,
                     "--output", tmp_path / "out.csv")
    line = assert_clean_error(result, 1, fragment)
    assert "b.png" in line
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (["-k", "0"], 2, "k must be between 1"),
    (["-k", "2701"], 2, "k must be between 1 and the training size 2700"),
    (["--index", "annoy"], 1, "no index 'annoy'"),
    (["--collection", "nosuch"], 1, "no collection 'nosuch'"),
    (["--index", "hnsw", "--param", "nprobe=4"], 2, "does not take search parameter 'nprobe'"),
    (["--index", "flat", "--param", "efSearch=4"], 2, "takes no search parameters"),
    (["--index", "hnsw", "--param", "efSearch=many"], 2, "is not a number"),
    (["--index", "ivf", "--param", "nprobe=2.5"], 2, "whole number"),
    (["--index", "ivf", "--param", "nprobe"], 2, "is not NAME=VALUE"),
    (["--output", "out.txt"], 2, "must end in .parquet or .csv"),
    (["--weights", "cubic"], 2, "cubic"),
])
def test_bad_arguments(built: Collection, tmp_path: Path, monkeypatch, args, code,
                       fragment) -> None:
    monkeypatch.chdir(tmp_path)
    if "--output" not in args:
        args = [*args, "--output", tmp_path / "out.csv"]
    assert_no_output(run_cli("query", *SYN, *args), tmp_path, code, fragment)
    assert not (tmp_path / "out.txt").exists()


def test_index_changed_after_build_is_refused(built: Collection, tmp_path: Path,
                                              use_store) -> None:
    built = use_store(writable_copy(built, tmp_path / "copy"))
    path = built.root / built.indexes["hnsw"]["file"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    result = run_cli("query", *SYN, "--index", "hnsw", "--output", tmp_path / "out.csv")
    assert_no_output(result, tmp_path, 1, "fails its checksum")
    with pytest.raises(IntegrityError):
        Collection.open(built.root.parent, "syn").searcher("hnsw")


@pytest.mark.parametrize(("queries", "fragment"), [
    (np.full((2, 784), 0.5, np.float32), "not whole numbers"),
    (np.full((2, 784), 300), "outside 0..255"),
    (np.full((2, 784), np.nan), "NaN"),
    (np.zeros((2, 783), np.uint8), "expected [n, 784]"),
    (np.zeros((0, 784), np.uint8), "no images"),
    (np.array([["a"] * 784]), "expected numbers"),
])
def test_every_entry_point_rejects_queries_that_are_not_pixels(built: Collection, queries,
                                                               fragment: str) -> None:
    classifier = built.classifier("flat")
    for entry in (classifier.predict, classifier.predict_proba, classifier.kneighbors,
                  classifier.classify, built.searcher("hnsw").search):
        args = (queries, 7) if entry.__name__ == "search" else (queries,)
        with pytest.raises(InvalidArgument, match=re.escape(fragment)):
            entry(*args)


def test_whole_number_queries_of_any_dtype_rank_like_uint8(built: Collection) -> None:
    pixels = built.test().pixels[:30]
    searcher = built.searcher("flat")
    expected = searcher.search(pixels, 7)
    for kind in (np.int64, np.float64, np.float32):
        found = searcher.search(pixels.astype(kind), 7)
        np.testing.assert_array_equal(found.rows, expected.rows)
        np.testing.assert_array_equal(found.distances, expected.distances)
    square = searcher.search(pixels.reshape(-1, 28, 28), 7)
    np.testing.assert_array_equal(square.rows, expected.rows)


def test_neighbours_an_index_cannot_find_are_marked_missing(isolated: Path) -> None:
    from mnist_ann.index.neighbours import MISSING

    images, labels = clustered_digits(800, seed=4)
    collection = make_collection(isolated / "store", "sparse", images, labels)
    build_indexes(collection, [resolve_recipe("sq=IVF16,Flat", 720)], threads=1)
    found = collection.searcher("sq").search(collection.test().pixels, 60, {"nprobe": 1})
    missing = found.rows < 0
    assert missing.any()  # one list of about 45 rows cannot hold 60 neighbours
    assert (found.distances[missing] == MISSING).all()
    assert (found.distances[~missing] >= 0).all()


# --- confidence and rejection --------------------------------------------------------------

def test_rejection_arithmetic() -> None:
    from mnist_ann.evaluation.metrics import rejection

    confidence = np.array([1.0, 0.9, 0.5, 0.4, 1.0])
    predicted = np.array([1, 2, 3, 4, 5])
    truth = np.array([1, 0, 3, 4, 0])
    summary = rejection(confidence, predicted, truth, 0.5)
    assert summary == {"reject_below": 0.5, "accepted": 4, "rejected": 1, "coverage": 0.8,
                       "accepted_accuracy": 0.5, "accepted_error": 0.5}
    assert rejection(confidence, predicted, truth, 1.01)["accepted_accuracy"] == 1.0
    assert "accepted_accuracy" not in rejection(confidence, predicted, None, 0.5)


def test_risk_coverage_and_the_fewest_rejections() -> None:
    from mnist_ann.evaluation.metrics import fewest_rejections, risk_coverage

    confidence = np.array([1.0, 1.0, 0.5, 0.5, 0.9, 0.2, 0.9])
    correct = np.array([True, True, False, True, True, False, True])
    curve = risk_coverage(confidence, correct)
    np.testing.assert_array_equal(curve["threshold"], [1.0, 0.9, 0.5, 0.2])
    np.testing.assert_allclose(curve["coverage"], np.array([2, 4, 6, 7]) / 7)
    np.testing.assert_allclose(curve["error"], [0, 0, 1 / 6, 2 / 7])
    predicted, truth = np.where(correct, 3, 4), np.full(7, 3)
    best = fewest_rejections(confidence, predicted, truth, 0.0)
    assert best["reject_below"] == 0.9 and best["accepted"] == 4 and best["accepted_error"] == 0
    assert fewest_rejections(confidence, predicted, truth, 0.2)["reject_below"] == 0.5
    assert fewest_rejections(confidence, predicted, truth, 0.3)["coverage"] == 1.0
    always_wrong = fewest_rejections(confidence, np.full(7, 4), truth, 0.1)
    assert always_wrong is None


def test_a_bounded_error_keeps_fewer_queries_than_the_error_itself() -> None:
    from mnist_ann.evaluation.metrics import error_upper_bound, fewest_rejections

    z = 2.326
    # Wilson's bound: z²/(n + z²) when no error is seen, the error itself when z = 0, and
    # a measured error of p on n queries gives a bound above p that shrinks as n grows
    assert error_upper_bound(np.array(0.0), np.array(100), z) == pytest.approx(
        z * z / (100 + z * z))
    assert error_upper_bound(np.array(0.05), np.array(100), 0.0) == 0.05
    bounds = error_upper_bound(np.full(3, 0.01), np.array([100, 1_000, 100_000]), z)
    assert (bounds > 0.01).all() and (np.diff(bounds) < 0).all()
    rng = np.random.default_rng(4)
    confidence = rng.random(20_000)
    truth = np.zeros(20_000, np.int64)
    predicted = np.where(rng.random(20_000) < 0.02 * (1 - confidence), 1, 0)  # unsure: wrong
    plain = fewest_rejections(confidence, predicted, truth, 0.005)
    bounded = fewest_rejections(confidence, predicted, truth, 0.005, z)
    assert plain["accepted_error"] <= 0.005 and bounded["accepted_error"] <= 0.005
    assert bounded["coverage"] < plain["coverage"]
    n = bounded["accepted"]
    assert error_upper_bound(np.array(bounded["accepted_error"]), np.array(n), z) <= 0.005


def test_query_rejects_unsure_predictions(built: Collection, tmp_path: Path) -> None:
    import csv

    out = tmp_path / "out.csv"
    result = run_cli("query", *SYN, "--index", "flat", "--reject-below", "0.8", "--json",
                     "--output", out)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    classification = built.classifier("flat").classify(built.test().pixels)
    accepted = classification.confidence >= 0.8
    assert summary["accepted"] == accepted.sum() and summary["coverage"] == accepted.mean()
    expected = (classification.predictions == built.test().labels)[accepted].mean()
    assert summary["accepted_accuracy"] == pytest.approx(expected)
    rows = list(csv.DictReader(out.open()))
    assert [row["rejected"] == "True" for row in rows] == (~accepted).tolist()
    assert [float(row["confidence"]) for row in rows] == pytest.approx(
        classification.confidence.tolist(), abs=1e-6)
    assert_clean_error(run_cli("query", *SYN, "--reject-below", "1.5"), 2, "1.5")
