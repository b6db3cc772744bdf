"""Variants of deskew-idm that the planning notes pointed to, scored on held-out *training*
rows (leave-one-out, never the test set), with no gate:

    python bench/idm_variants.py [--store indexes] [--collection seed] [--held-out 3000]

- candidates: the candidate stage's nprobe 16 (the recipe's), 64, and every list (exact);
- pool: the 100 or 200 nearest re-ranked;
- an IDM over the raw (not deskewed) images added to the deskewed one, with weight w;
- k = 1 or 3.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mnist_ann import Store
from mnist_ann.classify import Classifier
from mnist_ann.evaluation.tune import HeldOut
from mnist_ann.index.idm import gradient_features, idm_distances
from mnist_ann.index.neighbours import Neighbours
from mnist_ann.runtime import faiss_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--held-out", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    searcher = collection.searcher("deskew-idm")
    train = collection.train()
    held = HeldOut.draw(train, args.held_out, args.seed)
    queries, truth = train.pixels[held.rows], train.labels[held.rows]
    voter = Classifier(searcher, train.labels, k=1)

    def accuracy(rows: np.ndarray, distances: np.ndarray, k: int) -> float:
        order = np.lexsort((rows, distances), axis=-1)[:, :k]
        found = Neighbours(np.take_along_axis(rows, order, 1),
                           np.take_along_axis(distances, order, 1))
        return float(np.mean(voter.votes(found) == truth))

    print(f"{len(queries):,} held-out training rows of {args.collection!r} (seed {args.seed}), "
          f"{args.threads} threads; accuracy with no gate")
    print("nprobe  pool  raw IDM weight  k=1     k=3")
    recipe = None
    for nprobe in (16, 64, 1024):
        with faiss_threads(args.threads):
            found = searcher.base.search(queries, 200 + held.copies,
                                         {"nprobe": nprobe, "candidates": 200 + held.copies})
            rows = held.drop(found, 200).rows
            deskewed = searcher.pool_distances(queries, rows)
        recipe = recipe or (rows[:, :100], deskewed[:, :100])
        for pool in (100, 200):
            r, d = rows[:, :pool], deskewed[:, :pool]
            print(f"{nprobe:<7} {pool:<5} {0:<15} {accuracy(r, d, 1):.4f}  "
                  f"{accuracy(r, d, 3):.4f}")
    rows, deskewed = recipe
    raw_train, raw_queries = gradient_features(train.pixels), gradient_features(queries)

    def raw_idm(i: int) -> np.ndarray:
        return idm_distances(raw_queries[i], raw_train, rows[i])

    with ThreadPoolExecutor(args.threads) as pool_of_threads:
        raw = np.stack(list(pool_of_threads.map(raw_idm, range(len(queries)))))
    for weight in (0.25, 0.5, 1.0, 2.0):
        d = deskewed + weight * raw
        print(f"{16:<7} {100:<5} {weight:<15} {accuracy(rows, d, 1):.4f}  "
              f"{accuracy(rows, d, 3):.4f}")

if __name__ == "__main__":
    main()
