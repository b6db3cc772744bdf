"""Accuracy, recall, confusion matrices and latency statistics: pure numpy."""

from __future__ import annotations

import numpy as np


def accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(predicted == truth)) if len(truth) else float("nan")


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int = 10) -> np.ndarray:
    """Counts [true label, predicted label]."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (truth.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


FLOAT_RECALL_TOLERANCE = 1e-5


def recall(found_distances: np.ndarray, true_distances: np.ndarray, k: int) -> float:
    """ann-benchmarks' recall@k: a returned neighbour counts when its distance is at most the
    true k-th distance, so that ties are not punished.

    Integer distances (pixels) are compared exactly. Float features carry float32 rounding
    that depends on the batch and thread count (BLAS blocking), so there a distance within a
    relative 1e-5 of the k-th counts; ann-benchmarks' absolute 1e-3 would be far too lenient
    on unit-length features.
    """
    return float(recall_hits(found_distances, true_distances, k).sum()
                 / (len(true_distances) * k))


def per_query_recall(found_distances: np.ndarray, true_distances: np.ndarray,
                     k: int) -> np.ndarray:
    """Each query's share of its k true neighbours found (recall@k's terms, per query)."""
    return recall_hits(found_distances, true_distances, k).mean(axis=1)


def recall_hits(found_distances: np.ndarray, true_distances: np.ndarray,
                k: int) -> np.ndarray:
    """Which of each query's k returned neighbours count for recall@k [n, k]."""
    threshold = true_distances[:, k - 1:k]
    if threshold.dtype.kind == "f":
        threshold = threshold * (1 + FLOAT_RECALL_TOLERANCE)
    return found_distances[:, :k] <= threshold


def latency_summary(seconds: np.ndarray) -> dict:
    """Percentiles of per-query latencies, in milliseconds."""
    milliseconds = np.asarray(seconds) * 1e3
    return {f"p{p}_ms": float(np.percentile(milliseconds, p)) for p in (50, 95, 99)}


def rejection(confidence: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None,
              threshold: float) -> dict:
    """Predictions with confidence under `threshold` rejected: how many are kept (coverage)
    and, with labels, the accuracy of those kept (1 when none are)."""
    accepted = confidence >= threshold
    summary = {"reject_below": threshold, "accepted": int(accepted.sum()),
               "rejected": int((~accepted).sum()),
               "coverage": float(accepted.mean()) if len(accepted) else 0.0}
    if truth is not None:
        right = predicted[accepted] == truth[accepted]
        summary["accepted_accuracy"] = float(right.mean()) if accepted.any() else 1.0
        summary["accepted_error"] = 1.0 - summary["accepted_accuracy"]
    return summary


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """The error on accepted queries at every threshold worth trying: each distinct
    confidence, from the highest (fewest accepted) to the lowest (all accepted).

    Returns arrays `threshold`, `accepted`, `coverage` and `error` (accepting confidence ≥
    threshold).
    """
    confidence, correct = np.asarray(confidence), np.asarray(correct, dtype=bool)
    order = np.argsort(-confidence, kind="stable")
    ranked, right = confidence[order], correct[order]
    # the last position of each distinct confidence: accepting it accepts all its ties
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    accepted = ends + 1
    errors = np.cumsum(~right)[ends]
    return {"threshold": ranked[ends], "accepted": accepted,
            "coverage": accepted / len(ranked), "error": errors / accepted}


def error_upper_bound(error: np.ndarray, accepted: np.ndarray, z: float) -> np.ndarray:
    """Wilson's one-sided upper confidence bound of an error rate measured on `accepted`
    queries (z: the normal quantile; 0 gives the error itself). Unlike mean + z standard
    errors it stays above 0 when no error was seen."""
    error, n = np.asarray(error, np.float64), np.asarray(accepted, np.float64)
    if z == 0:
        return error
    spread = z * np.sqrt(error * (1 - error) / n + z * z / (4 * n * n))
    return (error + z * z / (2 * n) + spread) / (1 + z * z / n)


def fewest_rejections(confidence: np.ndarray, predicted: np.ndarray, truth: np.ndarray,
                      max_error: float, z: float = 0.0) -> dict | None:
    """The rejection summary at the lowest threshold whose accepted error is at most
    `max_error` (the most queries kept), or None if no threshold reaches it. With z > 0 it
    is the error's upper confidence bound that must be at most `max_error`, so that a
    threshold chosen on one sample holds on another."""
    curve = risk_coverage(confidence, predicted == truth)
    bound = error_upper_bound(curve["error"], curve["accepted"], z)
    reaching = np.flatnonzero(bound <= max_error + 1e-12)
    if not len(reaching):
        return None
    return rejection(confidence, predicted, truth, float(curve["threshold"][reaching[-1]]))
