"""The query layer on the real MNIST: the original study reproduced exactly, ANN agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli
from sklearn.neighbors import KNeighborsClassifier

from mnist_ann.api import Collection
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import resolve_recipe

pytestmark = pytest.mark.slow


def sklearn_knn(collection: Collection, k: int, weights: str = "uniform"):
    train = collection.train()
    # the study fitted OpenML's float64 pixels; the same values, so the same model
    return KNeighborsClassifier(n_neighbors=k, weights=weights).fit(
        train.pixels.astype(np.float64), train.labels)


def test_flat_reproduces_the_study_exactly(seed_collection: Collection, seed_flat,
                                          tmp_path) -> None:
    output = tmp_path / "predictions.parquet"
    result = run_cli("query", "--store", seed_collection.root.parent, "--collection", "seed",
                     "--index", "flat", "--json", "--output", output)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["accuracy"] == 0.9687142857142857
    assert summary["correct"] == 13_562 and summary["n"] == 14_000
    import pyarrow.parquet as pq

    from_cli = pq.read_table(output).column("predicted").to_numpy()
    np.testing.assert_array_equal(from_cli, seed_flat.predictions)  # the CLI is the library
    expected = sklearn_knn(seed_collection, 7).predict(
        seed_collection.test().pixels.astype(np.float64))
    np.testing.assert_array_equal(seed_flat.predictions, expected)
    accuracy = np.mean(seed_flat.predictions == seed_collection.test().labels)
    assert accuracy == 0.9687142857142857


def test_flat_neighbour_lists_are_scikit_learns(seed_collection: Collection) -> None:
    queries = seed_collection.test().pixels[:1500]
    ours = seed_collection.searcher("flat").search(queries, 7)
    model = sklearn_knn(seed_collection, 7)
    distances, rows = model.kneighbors(queries.astype(np.float64))
    np.testing.assert_array_equal(ours.distances, np.rint(distances ** 2).astype(np.int64))
    # scikit-learn's final sort is not stable among equal distances; compare as sets there
    np.testing.assert_array_equal(np.sort(ours.rows, axis=1), np.sort(rows, axis=1))
    no_ties = (np.diff(ours.distances, axis=1) > 0).all(axis=1)
    np.testing.assert_array_equal(ours.rows[no_ties], rows[no_ties])


CASES = [("standard", 7, "uniform"), ("standard", 4, "uniform"), ("seed", 2, "uniform"),
         ("seed", 10, "uniform"), ("custom", 5, "uniform"), ("seed", 6, "distance")]


@pytest.mark.parametrize(("which", "k", "weights"), CASES)
def test_flat_matches_scikit_learn_and_ann_agrees(request: pytest.FixtureRequest, which: str,
                                                  k: int, weights: str) -> None:
    collection: Collection = request.getfixturevalue(f"{which}_collection")
    queries = collection.test().pixels[:1000]
    flat = collection.classifier("flat", k=k, weights=weights).classify(queries)
    expected = sklearn_knn(collection, k, weights).predict(queries.astype(np.float64))
    np.testing.assert_array_equal(flat.predictions, expected)
    for name in ("hnsw", "ivf") if which == "seed" else ():  # built on the seed split only
        approximate = collection.classifier(name, k=k, weights=weights).classify(queries)
        agreement = np.mean(approximate.predictions == flat.predictions)
        assert agreement >= 0.99, (name, agreement)


def test_confusion_matrix_and_output_on_real_data(seed_collection: Collection, tmp_path) -> None:
    out, png = tmp_path / "p.parquet", tmp_path / "c.png"
    result = run_cli("query", "--store", seed_collection.root.parent, "--index", "hnsw",
                     "--param", "efSearch=128", "--output", out, "--confusion", png, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["params"] == {"efSearch": 128} and summary["accuracy"] > 0.96
    assert png.read_bytes()[:4] == b"\x89PNG"
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pydict()
    assert len(table["query"]) == 14_000
    assert np.mean(np.array(table["predicted"]) == np.array(table["label"])) == \
        summary["accuracy"]


def test_exact_pca_equals_flat_on_every_seed_query(seed_collection: Collection,
                                                   seed_flat) -> None:
    build_indexes(seed_collection, [resolve_recipe("exact-pca", len(seed_collection.train()))],
                  threads=2)
    queries = seed_collection.test().pixels
    flat = seed_flat
    for components in (48, 128):
        ours = seed_collection.classifier("exact-pca",
                                          params={"components": components}).classify(queries)
        np.testing.assert_array_equal(ours.neighbours.rows, flat.neighbours.rows)
        np.testing.assert_array_equal(ours.neighbours.distances, flat.neighbours.distances)
        np.testing.assert_array_equal(ours.predictions, flat.predictions)
        assert ours.stats["verified_median"] < 1000  # it pruned: 56,000 rows, a few verified
    assert np.mean(flat.predictions == seed_collection.test().labels) == 0.9687142857142857
    # one query at a time (the point path): the queries farthest from their neighbours, for
    # which the first axes prune least (they take the scans over every row), and others
    searcher = seed_collection.searcher("exact-pca")
    hardest = np.argsort(flat.neighbours.distances[:, -1])[-100:]
    chosen = np.concatenate([hardest, np.arange(0, len(queries), 140)])
    for i in chosen:
        one = searcher.search(queries[i:i + 1], 7)
        np.testing.assert_array_equal(one.rows[0], flat.neighbours.rows[i])
        np.testing.assert_array_equal(one.distances[0], flat.neighbours.distances[i])


def test_deskew_pca_beats_raw_pixels_through_an_approximate_index(
        seed_collection: Collection) -> None:
    build_indexes(seed_collection, [resolve_recipe("deskew-pca-ivf",
                                                   len(seed_collection.train()))], threads=2)
    test = seed_collection.test()
    result = seed_collection.classifier("deskew-pca-ivf").classify(test.pixels)
    assert np.mean(result.predictions == test.labels) >= 0.985


def test_small_recipes_meet_their_size_and_accuracy_on_the_seed_split(
        seed_collection: Collection, tmp_path) -> None:
    """Issue 18's size targets at the recipes' defaults (which `tune --max-memory` also
    chooses on held-out training rows): ≥ 98.5% within 4 MB, ≥ 97.5% within 1 MB; an
    exported model predicts as its index."""
    from mnist_ann.model import export_model, read_model
    from mnist_ann.store.collection import resident_bytes

    n_train = len(seed_collection.train())
    build_indexes(seed_collection, [resolve_recipe(name, n_train)
                                    for name in ("deskew-pca-sq8", "deskew-pca-pq")], threads=2)
    test = seed_collection.test()
    for name, budget, floor in (("deskew-pca-sq8", 4e6, 0.985), ("deskew-pca-pq", 1e6, 0.975)):
        assert resident_bytes(seed_collection.indexes[name], n_train) <= budget, name
        result = seed_collection.classifier(name).classify(test.pixels)
        assert np.mean(result.predictions == test.labels) >= floor, name
        export_model(seed_collection, name, tmp_path / f"{name}.model")
        assert (tmp_path / f"{name}.model").stat().st_size <= budget
        model = read_model(tmp_path / f"{name}.model").classifier()
        np.testing.assert_array_equal(model.predict(test.pixels), result.predictions)
