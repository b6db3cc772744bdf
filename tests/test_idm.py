"""The image distortion model re-rank: the kernel against the definition, the gate's choices,
the stage behind the searcher protocol, and its accuracy on the real MNIST."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli

from mnist_ann.errors import InvalidArgument
from mnist_ann.index.idm import (
    IdmSearcher,
    _idm_numpy,
    fast_kernel,
    gradient_features,
    idm_distances,
    idm_distances_reference,
)
from mnist_ann.index.neighbours import Neighbours


@pytest.fixture(scope="module")
def random_features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (12, 784), dtype=np.uint8)
    images[:, :200] = 0  # some blank rows, as in digits
    features = gradient_features(images)
    return features[0], features[1:]


def test_gradients_are_sobel() -> None:
    image = np.zeros((28, 28), np.uint8)
    image[:, 14:] = 255  # a vertical edge
    gx, gy = gradient_features(image.reshape(1, 784))[0]
    assert gx[10, 13] == pytest.approx(4.0) and gx[10, 14] == pytest.approx(4.0)
    assert gx[10, 5] == 0 and np.abs(gy[1:-1]).max() == 0


@pytest.mark.parametrize("warp", [0, 1, 2])
def test_the_kernels_agree_with_the_definition(random_features, warp: int) -> None:
    query, train = random_features
    expected = idm_distances_reference(query, train, warp)
    np.testing.assert_allclose(_idm_numpy(query, train, warp), expected, rtol=1e-5)
    assert fast_kernel() is not None  # numba is installed with the test extra
    rows = np.array([4, 0, 7, 7, 2])
    np.testing.assert_allclose(idm_distances(query, train, rows, warp), expected[rows],
                               rtol=1e-5)


def test_warping_forgives_a_shift_that_l2_does_not() -> None:
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:15] = 255
    shifted = np.roll(digit, 2, axis=1)
    other = np.zeros((28, 28), np.uint8)
    other[13:16, 6:22] = 255
    features = gradient_features(np.stack([shifted, other]).reshape(2, 784))
    query = gradient_features(digit.reshape(1, 784))[0]
    near_shifted, near_other = idm_distances(query, features, np.array([0, 1]))
    assert near_shifted == pytest.approx(0, abs=1e-6) and near_other > 1
    assert idm_distances(query, features, np.array([0]), warp=1)[0] > 0


class FixedBase:
    """A base searcher that returns given candidates, as the protocol says."""

    def __init__(self, rows: np.ndarray, ntotal: int) -> None:
        self.rows, self.ntotal, self.space, self.name = rows, ntotal, None, "base"
        self.asked: list[tuple[int, dict]] = []

    def with_defaults(self, defaults: dict) -> FixedBase:
        return self

    def parameters(self, overrides=None) -> dict:
        unknown = set(overrides or {}) - {"candidates", "nprobe"}
        if unknown:
            raise InvalidArgument(f"base does not take {unknown}")
        return dict(overrides or {})

    def search(self, queries: np.ndarray, k: int, params=None) -> Neighbours:
        self.asked.append((k, dict(params or {})))
        rows = self.rows[:, :k]
        return Neighbours(rows, np.arange(rows.size, dtype=np.float64).reshape(rows.shape))


def test_the_gate_answers_unanimous_queries_and_reranks_the_rest() -> None:
    rng = np.random.default_rng(5)
    train = rng.integers(0, 256, (40, 784), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 10)  # rows 0-9 are 0s, 10-19 are 1s, ...
    candidates = np.array([[0, 1, 2, 3, 11, 12, 13, 14],      # first 4 agree: gated
                           [0, 11, 1, 2, 3, 12, 13, 14]])     # they do not: re-ranked
    base = FixedBase(candidates, 40)
    searcher = IdmSearcher(base, train, labels, {"pool": 8, "gate": 4}, "idm")
    queries = rng.integers(0, 256, (2, 784), dtype=np.uint8)
    found = searcher.search(queries, 3)
    assert found.stats == {"gated": 1, "reranked": 1}
    assert base.asked[-1] == (8, {"candidates": 8})
    np.testing.assert_array_equal(found.rows[0], [0, 1, 2])  # the base's own order
    from mnist_ann.data.pipeline import deskew

    query = gradient_features(deskew(queries[1:]))[0]
    scores = idm_distances_reference(query, gradient_features(deskew(train))[candidates[1]])
    order = np.lexsort((candidates[1], scores))[:3]
    np.testing.assert_array_equal(found.rows[1], candidates[1][order])
    np.testing.assert_allclose(found.distances[1], scores[order], rtol=1e-5)
    # gate = pool: nothing that could change the vote is skipped
    assert IdmSearcher(base, train, labels, {"pool": 8, "gate": 8}, "idm").search(
        queries, 3).stats == {"gated": 0, "reranked": 2}


@pytest.mark.parametrize(("params", "fragment"), [
    ({"pool": 0}, "at least 1"), ({"gate": 41}, "at most 40"), ({"pool": "many"}, "number"),
    ({"efSearch": 3}, "does not take"),
])
def test_bad_idm_parameters(params: dict, fragment: str) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (40, 784), dtype=np.uint8)
    searcher = IdmSearcher(FixedBase(np.zeros((1, 8), np.int64), 40), train,
                           np.zeros(40, np.int64), {"pool": 8, "gate": 4, "k": 3}, "idm")
    assert searcher.default_k == 3 and "k" not in searcher.parameters()
    with pytest.raises(InvalidArgument, match=fragment):
        searcher.parameters(params)


@pytest.mark.slow
def test_deskew_idm_on_the_real_seed_split(mnist, tmp_path_factory) -> None:
    from mnist_ann.data.mnist import Split
    from mnist_ann.index.build import build_indexes
    from mnist_ann.index.recipes import resolve_recipe
    from mnist_ann.store.manage import create_collection

    store = tmp_path_factory.mktemp("idm-store")
    collection = create_collection(store, "seed", mnist, Split.make("seed"), lambda m: None)
    build_indexes(collection, [resolve_recipe("deskew-idm", 56_000)], threads=2)
    result = run_cli("query", "--store", store, "--collection", "seed", "--index",
                     "deskew-idm", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["accuracy"] >= 0.992, summary
    assert summary["idm"]["reranked"] > 0 and summary["idm"]["gated"] > 0
