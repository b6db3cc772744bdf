"""The classifier on top of any searcher: scikit-learn's k-NN vote, and its methods.

`Classifier` holds a searcher, the training labels and a setting (k, search parameters,
weights, threads); it keeps no per-call state, so one classifier may serve many threads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mnist_ann.errors import InvalidArgument
from mnist_ann.index.neighbours import Neighbours, check_k
from mnist_ann.runtime import check_threads, faiss_threads

if TYPE_CHECKING:
    from mnist_ann.index.searchers import Searcher

WEIGHTS = ("uniform", "distance")


def vote_scores(neighbour_labels: np.ndarray, distances: np.ndarray, n_classes: int,
                weights: str = "uniform") -> np.ndarray:
    """scikit-learn's k-NN vote: per query, each class's votes [n, n_classes].

    neighbour_labels [n, k] are class positions (-1 for a neighbour not found, which does not
    vote); distances [n, k] are squared. uniform: one vote each; distance: votes weighted by
    1/distance (Euclidean), and where a query has neighbours at distance 0 only those count.
    The winner is the first largest (ties to the smallest class); `shares` makes them sum to 1.
    """
    if weights not in WEIGHTS:
        raise InvalidArgument(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    one_hot = neighbour_labels[:, :, None] == np.arange(n_classes)[None, None, :]
    if weights == "uniform":
        scores = one_hot.sum(axis=1, dtype=np.float64)
    else:
        euclidean = np.sqrt(distances.astype(np.float64))
        with np.errstate(divide="ignore"):
            inverse = 1.0 / euclidean
        inverse[neighbour_labels < 0] = 0.0
        exact_match = np.isinf(inverse)
        rows = exact_match.any(axis=1)
        inverse[rows] = exact_match[rows]
        scores = (one_hot * inverse[:, :, None]).sum(axis=1)
    return scores


def shares(scores: np.ndarray) -> np.ndarray:
    """Votes as each class's share (rows sum to 1; 0 everywhere when nothing voted)."""
    totals = scores.sum(axis=1, keepdims=True)
    return np.divide(scores, totals, out=np.zeros_like(scores), where=totals > 0)


def vote(neighbour_labels: np.ndarray, distances: np.ndarray, classes: np.ndarray,
         weights: str = "uniform") -> np.ndarray:
    """The winning label of each query (ties to the smallest), from labels in `classes`."""
    positions = np.searchsorted(classes, neighbour_labels)
    known = (neighbour_labels >= 0) & (positions < len(classes))
    known[known] &= classes[positions[known]] == neighbour_labels[known]
    scores = vote_scores(np.where(known, positions, -1), distances, len(classes), weights)
    return classes[np.argmax(scores, axis=1)]


@dataclass(frozen=True)
class Classification:
    """Predicted labels of a batch of queries, with their neighbours and timing."""

    predictions: np.ndarray
    neighbours: Neighbours
    neighbour_ids: np.ndarray  # ids of the neighbours [n, k] (MNIST-70k rows), -1 where none
    proba: np.ndarray  # each class's share of the vote [n, n_classes]
    params: dict
    k: int
    weights: str
    seconds: float  # search and vote, nothing else
    threads: int
    stats: dict = field(default_factory=dict)

    confidences: np.ndarray | None = None  # from the searcher's pool, where it kept one

    @property
    def confidence(self) -> np.ndarray:
        """Each prediction's confidence in [0, 1]: the winning label's share of the vote, or
        where the searcher kept its candidate pool, `pool_confidence`."""
        return self.proba.max(axis=1) if self.confidences is None else self.confidences

    @property
    def queries_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else float("inf")


POOL_SHARE = 7  # the pool's nearest whose labels the confidence counts


def pool_confidence(label_positions: np.ndarray, pool: Neighbours,
                    predicted: np.ndarray) -> np.ndarray:
    """Confidence from a ranked candidate pool [n, m]: the predicted label's share of the
    pool's POOL_SHARE nearest, times its distance margin 1 - d(nearest of that label) /
    d(nearest of any other label) (1 when the pool holds no other label). Chosen on held-out
    training rows (bench/confidence_idm.py): for deskew-idm it rejects what a vote of
    unanimous neighbours cannot."""
    found = pool.rows >= 0
    labels = np.where(found, label_positions[np.maximum(pool.rows, 0)], -1)
    same = labels == predicted[:, None]
    share = same[:, :POOL_SHARE].sum(axis=1) / np.maximum(found[:, :POOL_SHARE].sum(axis=1), 1)
    distances = pool.distances.astype(np.float64)
    nearest_same = np.where(same, distances, np.inf).min(axis=1)
    nearest_other = np.where(~same & found, distances, np.inf).min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        margin = np.where(np.isinf(nearest_other), 1.0,
                          np.clip(1 - nearest_same / nearest_other, 0, 1))
    margin = np.where(np.isnan(margin), 0.0, margin)  # both at distance 0: no margin
    return share * margin


class Classifier:
    """k-NN classification by any searcher: predict, predict_proba, kneighbors, score.

    labels: the training rows' labels (any sortable values); ids: what to report for a
    training row (its MNIST-70k id), the row position when not given.
    """

    def __init__(self, searcher: Searcher, labels: np.ndarray, *, ids: np.ndarray | None = None,
                 k: int = 7, params: Mapping | None = None, weights: str = "uniform",
                 threads: int | None = None) -> None:
        if len(labels) != searcher.ntotal:
            raise InvalidArgument(f"{len(labels):,} labels for {searcher.ntotal:,} training rows")
        if weights not in WEIGHTS:
            raise InvalidArgument(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
        self.searcher = searcher
        self.classes, self._label_positions = np.unique(np.asarray(labels), return_inverse=True)
        self.ids = np.arange(searcher.ntotal) if ids is None else np.asarray(ids)
        self.k = check_k(k, searcher.ntotal)
        self.params = dict(params or {})
        self.weights = weights
        self.threads = check_threads(threads)
        self.effective_params = searcher.parameters(self.params)  # checked now, not at use

    def __repr__(self) -> str:
        return (f"Classifier({self.searcher.name!r}, k={self.k}, params={self.effective_params}, "
                f"weights={self.weights!r}, threads={self.threads})")

    @property
    def space(self) -> str:
        return self.searcher.space.description

    def neighbours(self, queries: np.ndarray, k: int | None = None) -> Neighbours:
        """Each query's k nearest training rows, exactly ranked (k defaults to the
        classifier's)."""
        with faiss_threads(self.threads):
            return self.searcher.search(queries, self.k if k is None else k, self.params)

    def scores_of(self, neighbours: Neighbours) -> np.ndarray:
        """Each class's votes [n, n_classes]; missing neighbours do not vote."""
        positions = np.where(neighbours.rows >= 0,
                             self._label_positions[np.maximum(neighbours.rows, 0)], -1)
        return vote_scores(positions, neighbours.distances, len(self.classes), self.weights)

    def confidences(self, neighbours: Neighbours, scores: np.ndarray) -> np.ndarray:
        """Each winner's confidence: its share of the vote, or `pool_confidence` where the
        searcher kept its ranked pool."""
        winners = np.argmax(scores, axis=1)
        if neighbours.pool is None:
            return shares(scores)[np.arange(len(winners)), winners]
        return pool_confidence(self._label_positions, neighbours.pool, winners)

    def votes(self, neighbours: Neighbours) -> np.ndarray:
        """scikit-learn's vote of each query's neighbours (ties to the smallest label)."""
        return self.classes[np.argmax(self.scores_of(neighbours), axis=1)]

    def classify(self, queries: np.ndarray) -> Classification:
        """Predictions with their neighbours, vote shares and the search's own time."""
        started = time.perf_counter()
        neighbours = self.neighbours(queries)
        scores = self.scores_of(neighbours)
        predictions = self.classes[np.argmax(scores, axis=1)]
        proba = shares(scores)
        seconds = time.perf_counter() - started
        ids = np.where(neighbours.rows >= 0, self.ids[np.maximum(neighbours.rows, 0)], -1)
        confidences = self.confidences(neighbours, scores)
        return Classification(predictions, neighbours, ids, proba, dict(self.effective_params),
                              self.k, self.weights, seconds, self.threads, neighbours.stats,
                              confidences)

    def predict(self, queries: np.ndarray) -> np.ndarray:
        return self.votes(self.neighbours(queries))

    def predict_proba(self, queries: np.ndarray) -> np.ndarray:
        """Each class's share of the vote, columns in the order of `classes`."""
        return shares(self.scores_of(self.neighbours(queries)))

    def kneighbors(self, queries: np.ndarray, n_neighbors: int | None = None,
                   return_distance: bool = True) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """As scikit-learn's: (Euclidean distances, training row positions) [n, k]."""
        found = self.neighbours(queries, n_neighbors)
        if not return_distance:
            return found.rows
        return np.sqrt(found.distances.astype(np.float64)), found.rows

    def score(self, queries: np.ndarray, labels: np.ndarray) -> float:
        """Mean accuracy of the predictions against `labels`."""
        labels = np.asarray(labels)
        if len(labels) != len(queries):
            raise InvalidArgument(f"{len(labels):,} labels for {len(queries):,} queries")
        return float(np.mean(self.predict(queries) == labels))
