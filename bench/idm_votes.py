"""deskew-idm's re-rank with no gate, on held-out *training* rows (leave-one-out, never the
test set): its accuracy with as many rows as wanted, and other vote rules over the ranked pool.

    python bench/idm_votes.py [--store indexes] [--collection seed] [--held-out N] [--seed S]

`--held-out` defaults to every training row but one (each held out alone; about 80 s for the
seed split on 2 threads). The pool is the index's own nprobe and `--pool` nearest. Rules:
- majority of the k nearest (scikit-learn's vote, ties to the smallest label);
- local mean: the label whose j nearest in the pool have the smallest mean IDM distance;
- weighted: each of the k nearest votes with weight (d1 / d)^p, d1 the nearest's distance.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mnist_ann import Store
from mnist_ann.classify import Classifier
from mnist_ann.evaluation.tune import HeldOut, pool_rows
from mnist_ann.index.neighbours import Neighbours, order_exactly
from mnist_ann.runtime import faiss_threads


def local_mean(labels: np.ndarray, distances: np.ndarray, j: int) -> np.ndarray:
    """The label whose j nearest of each pool have the smallest mean distance."""
    means = np.stack([np.sort(np.where(labels == c, distances, np.inf), axis=1)[:, :j].mean(1)
                      for c in range(10)], axis=1)
    return means.argmin(axis=1)


def weighted(labels: np.ndarray, distances: np.ndarray, k: int, power: float) -> np.ndarray:
    """Each of the k nearest votes with weight (d1 / d)^power."""
    weights = (distances[:, :1] / np.maximum(distances[:, :k], 1e-12)) ** power
    scores = np.zeros((len(labels), 10))
    np.add.at(scores, (np.arange(len(labels))[:, None], labels[:, :k]), weights)
    return scores.argmax(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--index", default="deskew-idm")
    parser.add_argument("--held-out", type=int, default=None,
                        help="held-out training rows (default: all but one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    searcher = collection.searcher(args.index)
    train = collection.train()
    held = HeldOut.draw(train, args.held_out or len(train) - 1, args.seed)
    queries, truth = train.pixels[held.rows], train.labels[held.rows]
    nprobe = searcher.parameters()["nprobe"]
    started = time.perf_counter()
    with faiss_threads(args.threads):
        rows = pool_rows(searcher, queries, held, args.pool, {"nprobe": nprobe})
        ranked = order_exactly(rows, searcher.pool_distances(queries, rows), args.pool)
    labels = train.labels[np.maximum(ranked.rows, 0)]
    print(f"{args.collection}: {len(queries):,} held-out training rows (seed {args.seed}), "
          f"nprobe {nprobe}, pool {args.pool}, no gate, {args.threads} threads, "
          f"{time.perf_counter() - started:.0f} s")
    print("rule                     accuracy  errors")

    def line(rule: str, predicted: np.ndarray) -> None:
        wrong = int(np.count_nonzero(predicted != truth))
        print(f"{rule:<24} {1 - wrong / len(truth):.4%}  {wrong}")

    for k in (1, 3, 5, 7):
        voter = Classifier(searcher, train.labels, k=k)
        line(f"majority k={k}", voter.votes(Neighbours(ranked.rows[:, :k],
                                                       ranked.distances[:, :k])))
    for j in (2, 3, 4):
        line(f"local mean j={j}", local_mean(labels, ranked.distances, j))
    for k in (3, 5, 7, 10):
        for power in (1, 2, 4, 8):
            line(f"weighted k={k} p={power}", weighted(labels, ranked.distances, k, power))


if __name__ == "__main__":
    main()
