"""Which confidence lets deskew-idm reject its errors: scored on held-out *training* rows
(leave-one-out, never the test set), with the recipe's gate as the searcher applies it.

    python bench/confidence_idm.py [--store indexes] [--collection seed] [--held-out 20000]

For each held-out row: the 7 neighbours deskew-idm returns (the candidate stage's own for a
gated query, IDM's for the others), the prediction of its k=1, and three confidences: the
share of the 7 carrying the predicted label, the distance margin 1 - d(nearest with that
label) / d(nearest with another label), and their product; and three drawn from the whole
candidate pool rather than the 7 returned: the candidate stage's distance margin over the
pool (free), the IDM margin over the pool (every candidate compared, as if nothing were
gated), and the IDM margin of two candidates (a gated query compares only the first
candidate of the predicted label and the first of another: 2 comparisons), the first m of
each label (a few comparisons), and the one the classifier now uses (`pool_confidence`): the
predicted label's share of the IDM-ranked pool's 7 nearest times the IDM margin. Prints the
area under each risk-coverage curve, the most coverage at an accepted error of 0.1% and 0.2%,
and for `pool_confidence` the threshold reaching 0.2% here and the one whose error's 99%
upper confidence bound (Wilson) reaches it: the one to pass to `query --reject-below`, since
a threshold that just reaches 0.2% on these rows lands on either side of it on others.
"""

from __future__ import annotations

import argparse

import numpy as np

from mnist_ann import Store
from mnist_ann.classify import pool_confidence
from mnist_ann.evaluation.metrics import fewest_rejections, risk_coverage
from mnist_ann.evaluation.tune import CONFIDENCE, CONFIDENCE_Z, HeldOut
from mnist_ann.index.neighbours import Neighbours
from mnist_ann.runtime import faiss_threads

SHOWN = 7


def area_under(confidence: np.ndarray, correct: np.ndarray) -> float:
    curve = risk_coverage(confidence, correct)
    coverage = np.concatenate([[0.0], curve["coverage"]])
    return float(np.sum(np.diff(coverage) * curve["error"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--held-out", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    searcher = collection.searcher("deskew-idm")
    settings = searcher.parameters()
    pool, gate = settings["pool"], settings["gate"]
    train = collection.train()
    held = HeldOut.draw(train, args.held_out, args.seed)
    queries, truth = train.pixels[held.rows], train.labels[held.rows]
    with faiss_threads(args.threads):
        found = held.drop(searcher.base.search(
            queries, held.searched(pool), {"nprobe": settings["nprobe"],
                                           "candidates": held.searched(pool)}), pool)
        scores = searcher.pool_distances(queries, found.rows)
    labels = train.labels[found.rows]
    gated = (labels[:, :gate] == labels[:, :1]).all(axis=1)
    order = np.lexsort((found.rows, scores), axis=-1)
    rows = np.where(gated[:, None], found.rows, np.take_along_axis(found.rows, order, 1))
    distances = np.where(gated[:, None], found.distances, np.take_along_axis(scores, order, 1))
    shown, near = train.labels[rows[:, :SHOWN]], distances[:, :SHOWN]
    predicted = shown[:, 0]
    same = shown == predicted[:, None]
    share = same.mean(axis=1)
    margin = np.clip(1 - np.where(same, near, np.inf).min(axis=1)
                     / np.where(~same, near, np.inf).min(axis=1), 0, 1)
    pool_same = labels == predicted[:, None]

    def pool_margin(values: np.ndarray) -> np.ndarray:
        nearest_same = np.where(pool_same, values, np.inf).min(axis=1)
        nearest_other = np.where(~pool_same, values, np.inf).min(axis=1)
        return np.clip(1 - nearest_same / nearest_other, 0, 1)

    base_margin = pool_margin(found.distances.astype(np.float64))
    idm_margin = pool_margin(scores)
    # two comparisons a gated query: IDM to the first candidate (of the base order) of the
    # predicted label, and to the first of another label; a re-ranked query has the pool's
    first_same = np.argmax(pool_same, axis=1)
    first_other = np.argmax(~pool_same, axis=1)
    picked = np.full_like(scores, np.inf)
    at = np.arange(len(scores))
    picked[at, first_same] = scores[at, first_same]
    has_other = (~pool_same).any(axis=1)
    picked[at[has_other], first_other[has_other]] = scores[at[has_other], first_other[has_other]]
    two_margin = np.where(gated, pool_margin(picked), idm_margin)

    def first_of_each_label(m: int) -> tuple[np.ndarray, float]:
        """A gated query compares the first m candidates (base order) of every label in the
        pool: its IDM margin over those; with how many comparisons a gated query makes."""
        rank = np.zeros_like(labels, dtype=np.int64)
        for label in range(10):
            is_label = labels == label
            rank[is_label] = (np.cumsum(is_label, axis=1) - 1)[is_label]
        chosen = rank < m
        margin_m = pool_margin(np.where(chosen, scores, np.inf))
        return np.where(gated, margin_m, idm_margin), float(chosen[gated].sum(1).mean())

    each = {m: first_of_each_label(m) for m in (1, 2, 3, 5)}
    ranked = np.lexsort((found.rows, scores), axis=-1)  # the pool by IDM, as if ungated
    pool = Neighbours(np.take_along_axis(found.rows, ranked, 1),
                      np.take_along_axis(scores, ranked, 1))
    classes, positions = np.unique(train.labels, return_inverse=True)
    ungated = train.labels[pool.rows[:, 0]]  # k=1 over the IDM-ranked pool, nothing gated
    chosen = pool_confidence(positions, pool, np.searchsorted(classes, ungated))
    correct = predicted == truth
    print(f"{len(truth):,} held-out training rows of {args.collection!r} (seed {args.seed}); "
          f"deskew-idm {settings}, k=1: accuracy {correct.mean():.4f}, {gated.mean():.1%} gated")
    print("confidence                 area under r-c  coverage at error ≤ 0.1%  at ≤ 0.2%")
    for name, confidence in [("vote share", share), ("margin", margin),
                             ("share * margin", share * margin),
                             ("base margin over the pool", base_margin),
                             ("IDM margin over the pool", idm_margin),
                             ("IDM margin, 2 comparisons", two_margin),
                             *[(f"IDM, first {m} of each label", margin_m)
                               for m, (margin_m, _) in each.items()]]:
        at = [fewest_rejections(confidence, predicted, truth, e) for e in (0.001, 0.002)]
        shown_at = [f"{a['coverage']:.4f}" if a else "not reached" for a in at]
        print(f"{name:<26} {area_under(confidence, correct):.5f}       "
              f"{shown_at[0]:<25} {shown_at[1]}")
    print("comparisons a gated query makes for the first m of each label: " + ", ".join(
        f"m={m}: {count:.1f}" for m, (_, count) in each.items()))
    at = [fewest_rejections(chosen, ungated, truth, e) for e in (0.001, 0.002)]
    shown_at = [f"{a['coverage']:.4f}" if a else "not reached" for a in at]
    print(f"{'pool_confidence, gate=pool':<26} {area_under(chosen, ungated == truth):.5f}       "
          f"{shown_at[0]:<25} {shown_at[1]}   (ungated accuracy {np.mean(ungated == truth):.4f})")
    if at[1]:
        print(f"pool_confidence: error ≤ 0.2% here from threshold {at[1]['reject_below']:.4f}")
    bounded = fewest_rejections(chosen, ungated, truth, 0.002, CONFIDENCE_Z)
    if bounded:
        print(f"pool_confidence: the error's {CONFIDENCE:.0%} upper bound ≤ 0.2% from threshold "
              f"{bounded['reject_below']:.4f} (coverage {bounded['coverage']:.4f}, error "
              f"{bounded['accepted_error']:.4%} here)")
    wrong = ~correct
    print(f"errors with all {SHOWN} shown neighbours agreeing (confidence 1 by any of these): "
          f"{int((wrong & (share == 1)).sum())} of {int(wrong.sum())}")


if __name__ == "__main__":
    main()
