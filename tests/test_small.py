"""Small indexes (issue 18): compressed recipes ranked by their own codes, the memory they
need, `tune --max-memory`, and one exported model file that classifies without a store."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import struct
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import label_noise_digits
from helpers import assert_clean_error, forbid_the_test_set, make_collection, run_cli, tree

from mnist_ann.api import Collection
from mnist_ann.evaluation.tune import tune_memory
from mnist_ann.index.build import build_indexes
from mnist_ann.index.layers import drop_pca_rotations, index_layers
from mnist_ann.index.recipes import resolve_recipe
from mnist_ann.index.searchers import CodesSearcher
from mnist_ann.model import export_model, read_model
from mnist_ann.store.collection import resident_bytes

SMALL = ("flat", "deskew-pca-sq8", "deskew-pca-pq", "deskew-pca-ivf")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = label_noise_digits()
    store = tmp_path_factory.mktemp("small-indexes")
    collection = make_collection(store, "tiny", images, labels)
    build_indexes(collection, [resolve_recipe(name, len(collection.train())) for name in SMALL],
                  threads=2)
    return store


@pytest.fixture
def tiny(small_store: Path, tmp_path: Path) -> Collection:
    """A writable copy of the small collection."""
    shutil.copytree(small_store / "tiny", tmp_path / "store" / "tiny")
    return Collection.open(tmp_path / "store", "tiny")


@pytest.mark.parametrize("name", ["deskew-pca-sq8", "deskew-pca-pq"])
def test_a_codes_index_returns_its_own_nearest_ordered_by_distance_then_row(
        tiny: Collection, name: str) -> None:
    searcher = tiny.searcher(name)
    assert isinstance(searcher, CodesSearcher)
    queries = tiny.test().pixels
    found = searcher.search(queries, 7)
    features = searcher.space.embed(queries)
    distances, rows = searcher.index.search(features, 7, params=searcher._prepare(None)[1])
    # FAISS's own top 7 by its own distances, re-ordered only among equal distances
    np.testing.assert_allclose(found.distances, distances, rtol=1e-6)
    for mine, theirs in zip(found.rows, rows, strict=True):
        assert set(mine) == set(theirs)
    order = np.lexsort((found.rows, found.distances), axis=1)
    np.testing.assert_array_equal(order, np.broadcast_to(np.arange(7), order.shape))
    # against exact search in the same space: approximate, but most neighbours are right
    exact = tiny.exact_searcher(name).search(queries, 7)
    shared = np.mean([len(set(a) & set(b)) / 7 for a, b in zip(found.rows, exact.rows,
                                                                  strict=True)])
    assert 0.3 < shared <= 1.0, shared


def test_a_codes_index_never_reads_the_training_features(tiny: Collection) -> None:
    searcher = tiny.searcher("deskew-pca-pq")
    searcher.search(tiny.test().pixels[:20], 7)
    assert searcher.space._features is None and searcher.space._float32 is None


def test_trained_pcas_drop_their_full_rotation_and_search_the_same(tiny: Collection) -> None:
    stored = tiny.load_index("deskew-pca-sq8").index
    pcas = [t for layer in index_layers(stored)
            for t in ([faiss.downcast_VectorTransform(layer.chain.at(i))
                       for i in range(layer.chain.size())]
                      if isinstance(layer, faiss.IndexPreTransform) else [])
            if isinstance(t, faiss.PCAMatrix)]
    assert pcas and all(pca.PCAMat.size() == 0 and pca.A.size() == 48 * 784 for pca in pcas)
    # a PCA trained the same way with its rotation kept projects exactly the same
    train = tiny.train().pixels.astype(np.float32)
    keep = faiss.PCAMatrix(784, 16)
    keep.train(train)
    index = faiss.IndexPreTransform(keep, faiss.IndexFlatL2(16))
    before = keep.apply(train[:50])
    drop_pca_rotations(index)
    assert keep.PCAMat.size() == 0
    np.testing.assert_array_equal(keep.apply(train[:50]), before)


def test_resident_bytes_count_the_index_labels_and_the_features_ranked_with(
        tiny: Collection) -> None:
    rows = len(tiny.train())
    for name in SMALL:
        entry = tiny.indexes[name]
        features = 0 if name in ("deskew-pca-sq8", "deskew-pca-pq") else rows * 784
        assert resident_bytes(entry, rows) == entry["bytes"] + rows + features


def test_tune_max_memory_picks_the_most_accurate_that_fits_without_the_test_set(
        tiny: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_the_test_set(tiny, monkeypatch)
    rows = len(tiny.train())
    sizes = {name: resident_bytes(tiny.indexes[name], rows) for name in SMALL}
    budget = max(sizes["deskew-pca-sq8"], sizes["deskew-pca-pq"]) + 1
    result = tune_memory(tiny, budget, held_out=300, repeats=1)
    compared = {row["index"] for row in result["measured"]}
    assert compared == {name for name in SMALL if sizes[name] <= budget}
    assert "flat" not in compared and "deskew-pca-ivf" not in compared
    best = max(row["accuracy"] for row in result["measured"])
    chosen = result["chosen"]
    assert chosen["accuracy"] >= best - 1 / 300 - 1e-12
    assert result["index"] == chosen["index"] and result["resident_bytes"] <= budget
    entry = Collection.open(tiny.root.parent, "tiny").indexes[result["index"]]
    assert entry["tuned"]["target"] == {"kind": "memory", "value": budget}
    assert entry["search_defaults"] == chosen["params"]


def test_tune_max_memory_on_the_cli_prints_the_chosen_index(tiny: Collection) -> None:
    result = run_cli("tune", "--store", tiny.root.parent, "--collection", "tiny",
                     "--max-memory", "300MB", "--held-out", "300", "--repeats", "1",
                     "--json", "-q")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["index"] in SMALL and summary["chosen"]["index"] == summary["index"]


def test_a_budget_nothing_fits_is_one_line_and_changes_nothing(tiny: Collection) -> None:
    before = tree(tiny.root)
    result = run_cli("tune", "--store", tiny.root.parent, "--collection", "tiny",
                     "--max-memory", "10kB")
    assert_clean_error(result, 1, "fits")
    assert tree(tiny.root) == before
    bad = run_cli("tune", "--store", tiny.root.parent, "--collection", "tiny",
                  "--max-memory", "four megabytes")
    assert_clean_error(bad, 2, "not a size")


def test_an_exported_model_classifies_as_its_index_without_the_store(
        tiny: Collection, tmp_path: Path) -> None:
    queries = tiny.test().pixels
    np.save(tmp_path / "queries.npy", queries)
    for name in ("deskew-pca-sq8", "deskew-pca-pq", "flat"):
        out = tmp_path / f"{name}.model"
        exported = run_cli("export", "--store", tiny.root.parent, "--collection", "tiny",
                           "--index", name, "--out", out, "--json", "-q")
        assert exported.exit_code == 0, exported.stderr
        summary = json.loads(exported.stdout)
        assert summary["bytes"] == out.stat().st_size
        # the file is what resident_bytes counts, plus its header and checksum
        assert 0 < summary["bytes"] - summary["resident_bytes"] < 10_000
        expected = tiny.classifier(name).classify(queries)
        model = read_model(str(out))  # a path as a Python user types it
        got = model.classifier().classify(queries)
        np.testing.assert_array_equal(got.predictions, expected.predictions)
        np.testing.assert_array_equal(got.neighbours.distances, expected.neighbours.distances)
        # and through the CLI, with the store gone
        moved = tmp_path / "elsewhere" / out.name
        moved.parent.mkdir(exist_ok=True)
        out.rename(moved)
        result = run_cli("query", "--model", moved, "--input", tmp_path / "queries.npy",
                         "--output", tmp_path / f"{name}.csv", "--json", "-q")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["index"] == name
        with open(tmp_path / f"{name}.csv") as handle:
            predicted = [int(row["predicted"]) for row in csv.DictReader(handle)]
        np.testing.assert_array_equal(predicted, expected.predictions)


def test_a_damaged_or_hostile_model_is_refused_in_one_line(tiny: Collection,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "good.model"
    export_model(tiny, "deskew-pca-pq", out)
    np.save(tmp_path / "q.npy", tiny.test().pixels[:5])
    data = out.read_bytes()
    cases = {
        "flipped.model": (data[:200] + bytes([data[200] ^ 1]) + data[201:], "checksum"),
        "short.model": (data[:20], "too short"),
        "other.model": (b"PK\x03\x04" + data[4:], "not an mnist-ann model"),
    }
    # a header claiming more than the file holds, with a checksum that matches
    body = data[:16] + struct.pack("<Q", 1 << 40) + data[24:-32]
    cases["claims.model"] = (body + hashlib.sha256(body).digest(), "header claims")
    for filename, (content, fragment) in cases.items():
        (tmp_path / filename).write_bytes(content)
        result = run_cli("query", "--model", tmp_path / filename, "--input", tmp_path / "q.npy")
        assert_clean_error(result, 1, fragment)
    usage = run_cli("query", "--model", out, "--index", "flat", "--input", tmp_path / "q.npy")
    assert_clean_error(usage, 2, "--index")
    no_input = run_cli("query", "--model", out)
    assert_clean_error(no_input, 2, "--input")


def test_export_refuses_a_folder_that_does_not_exist(tiny: Collection, tmp_path: Path) -> None:
    result = run_cli("export", "--store", tiny.root.parent, "--collection", "tiny", "--index",
                     "flat", "--out", tmp_path / "missing" / "m.model")
    assert_clean_error(result, 2, "does not exist")
