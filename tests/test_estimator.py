"""`mnist_ann.KNeighborsClassifier` as a scikit-learn estimator."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from helpers import clustered_digits
from sklearn import neighbors
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from mnist_ann import KNeighborsClassifier

# every check of check_estimator passes; none is declared as an expected failure
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


def test_check_estimator_passes() -> None:
    results = check_estimator(KNeighborsClassifier(),
                              expected_failed_checks=EXPECTED_FAILED_CHECKS, on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results
              if r["status"] == "failed"]
    assert failed == []
    assert sum(r["status"] == "passed" for r in results) >= 50


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    images, labels = clustered_digits(2400, seed=31)
    labels = labels.copy()
    labels[::7] = (labels[::7] + 3) % 10  # label noise: predictions are not trivially right
    return images[:2000], labels[:2000], images[2000:], labels[2000:]


@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_flat_on_integers_equals_scikit_learn_exactly(digits, k: int, weights: str) -> None:
    X, y, X_test, _ = digits
    ours = KNeighborsClassifier(n_neighbors=k, weights=weights).fit(X, y)
    theirs = neighbors.KNeighborsClassifier(n_neighbors=k, weights=weights).fit(X, y)
    np.testing.assert_array_equal(ours.predict(X_test), theirs.predict(X_test))
    np.testing.assert_allclose(ours.predict_proba(X_test), theirs.predict_proba(X_test),
                               atol=1e-12)
    distances, rows = ours.kneighbors(X_test)
    their_distances, their_rows = theirs.kneighbors(X_test)
    np.testing.assert_allclose(distances, their_distances)
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.sort(their_rows, axis=1))


def test_ties_at_equal_distances_go_to_the_lower_rows() -> None:
    """Among rows at exactly the k-th distance the lower rows are kept (scikit-learn's brute
    force keeps an order that depends on its chunking, so it is not the reference here)."""
    rng = np.random.default_rng(5)
    base = rng.integers(0, 4, (60, 6))
    X = np.concatenate([base, base, base])  # every point three times: many exact ties
    y = rng.integers(0, 3, len(X))
    queries = rng.integers(0, 4, (200, 6))
    squared = ((queries[:, None, :] - X[None]) ** 2).sum(-1)
    for k in (2, 5, 8):
        model = KNeighborsClassifier(n_neighbors=k).fit(X, y)
        _, rows = model.kneighbors(queries)
        order = np.lexsort((np.broadcast_to(np.arange(len(X)), squared.shape), squared))[:, :k]
        np.testing.assert_array_equal(rows, order)
        votes = np.array([np.bincount(y[r], minlength=3).argmax() for r in order])
        np.testing.assert_array_equal(model.predict(queries), votes)


def test_any_labels_and_float_features(digits) -> None:
    X, y, X_test, _ = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    model = KNeighborsClassifier(index="flat").fit(X / 255.0, names[y])
    theirs = neighbors.KNeighborsClassifier(n_neighbors=7).fit(X / 255.0, names[y])
    assert set(model.classes_) == set(names)
    assert np.mean(model.predict(X_test / 255.0) == theirs.predict(X_test / 255.0)) > 0.99


@pytest.mark.parametrize("index", ["hnsw", "ivf", "pca-hnsw", "exact-pca", "IVF16,Flat",
                                   "HNSW16"])
def test_other_indexes_agree_with_exact_search(digits, index: str) -> None:
    X, y, X_test, _ = digits
    exact = KNeighborsClassifier().fit(X, y).predict(X_test)
    approximate = KNeighborsClassifier(index=index, threads=2).fit(X, y).predict(X_test)
    agreement = np.mean(approximate == exact)
    assert agreement == 1.0 if index == "exact-pca" else agreement >= 0.97


def test_in_a_pipeline_with_cross_validation_and_grid_search(digits) -> None:
    X, y, _, _ = digits
    pipeline = make_pipeline(MinMaxScaler(), KNeighborsClassifier(n_neighbors=5))
    scores = cross_val_score(pipeline, X, y, cv=3)
    theirs = cross_val_score(make_pipeline(MinMaxScaler(),
                                           neighbors.KNeighborsClassifier(n_neighbors=5)),
                             X, y, cv=3)
    np.testing.assert_allclose(scores, theirs, atol=0.01)
    search = GridSearchCV(make_pipeline(StandardScaler(), KNeighborsClassifier()),
                          {"kneighborsclassifier__n_neighbors": [1, 7],
                           "kneighborsclassifier__index": ["flat", "hnsw"]}, cv=2)
    search.fit(X, y)
    assert search.best_params_["kneighborsclassifier__n_neighbors"] in (1, 7)
    assert search.best_score_ > 0.7


def test_clone_and_pickle_keep_the_model(digits) -> None:
    X, y, X_test, _ = digits
    model = KNeighborsClassifier(n_neighbors=3, index="hnsw", params={"efSearch": 32},
                                 threads=1).fit(X, y)
    fresh = clone(model)
    assert fresh.get_params() == model.get_params() and not hasattr(fresh, "classes_")
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict(X_test), model.predict(X_test))


@pytest.mark.parametrize(("params", "fragment"), [
    ({"n_neighbors": 0}, "n_neighbors must be"),
    ({"weights": "cubic"}, "weights must be one of"),
    ({"index": "annoy"}, "invalid FAISS factory string"),
    ({"index": "deskew-flat"}, "needs 784 features"),
    ({"threads": 0}, "threads must be"),
    ({"index": "hnsw", "params": {"nprobe": 3}}, "does not take search parameter"),
])
def test_bad_settings_are_refused_at_fit(digits, params: dict, fragment: str) -> None:
    X, y, _, _ = digits
    with pytest.raises(ValueError, match=fragment):
        KNeighborsClassifier(**params).fit(X[:, :100] if "deskew" in str(params) else X, y)


@pytest.mark.slow
def test_the_study_through_the_estimator(seed_collection, seed_flat) -> None:
    train, test = seed_collection.train(), seed_collection.test()
    model = KNeighborsClassifier(n_neighbors=7, index="flat", threads=2).fit(train.pixels,
                                                                             train.labels)
    predictions = model.predict(test.pixels)
    assert np.mean(predictions == test.labels) == 0.9687142857142857
    np.testing.assert_array_equal(predictions, seed_flat.predictions)
    part = slice(0, 1000)  # score is the accuracy of predict (checked on a part: it predicts again)
    assert model.score(test.pixels[part], test.labels[part]) == np.mean(
        predictions[part] == test.labels[part])
