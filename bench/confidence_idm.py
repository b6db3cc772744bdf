"""Which confidence lets deskew-idm reject its errors: scored on held-out *training* rows
(leave-one-out, never the test set), with the recipe's gate as the searcher applies it.

    python bench/confidence_idm.py [--store indexes] [--collection seed] [--held-out 5000]

For each held-out row: the 7 neighbours deskew-idm returns (the candidate stage's own for a
gated query, IDM's for the others), the prediction of its k=1, and three confidences: the
share of the 7 carrying the predicted label, the distance margin 1 - d(nearest with that
label) / d(nearest with another label), and their product. Prints the area under each
risk-coverage curve and the most coverage at an accepted error of 0.1% and 0.2%.
"""

from __future__ import annotations

import argparse

import numpy as np

from mnist_ann import Store
from mnist_ann.evaluation.metrics import fewest_rejections, risk_coverage
from mnist_ann.evaluation.tune import HeldOut
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
    parser.add_argument("--held-out", type=int, default=5000)
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
            queries, pool + held.copies, {"nprobe": settings["nprobe"],
                                          "candidates": pool + held.copies}), pool)
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
    correct = predicted == truth
    print(f"{len(truth):,} held-out training rows of {args.collection!r} (seed {args.seed}); "
          f"deskew-idm {settings}, k=1: accuracy {correct.mean():.4f}, {gated.mean():.1%} gated")
    print("confidence     area under risk-coverage  coverage at error ≤ 0.1%  at ≤ 0.2%")
    for name, confidence in [("vote share", share), ("margin", margin),
                             ("share * margin", share * margin)]:
        at = [fewest_rejections(confidence, predicted, truth, e) for e in (0.001, 0.002)]
        shown_at = [f"{a['coverage']:.4f}" if a else "not reached" for a in at]
        print(f"{name:<14} {area_under(confidence, correct):.5f}                   "
              f"{shown_at[0]:<25} {shown_at[1]}")
    wrong = ~correct
    print(f"errors with all {SHOWN} shown neighbours agreeing (confidence 1 by any of these): "
          f"{int((wrong & (share == 1)).sum())} of {int(wrong.sum())}")


if __name__ == "__main__":
    main()
