"""Which space gives deskew-idm its candidates: the deskewed pixels' (L2norm,PCA48, the
deskew-pca recipes') or their gradient directions' (L2norm,PCA64, directions-ivf's), on
held-out *training* rows (leave-one-out, never the test set).

    python bench/bench_directions.py [--store indexes] [--collection seed] [--held-out N]

For each space, exact search there: the k-NN errors of the space itself, then the errors of
a majority of the k IDM-nearest among its `pool` nearest (no gate). `--held-out` defaults to
every training row but one, each held out alone (about 5 minutes for the seed split on 2
threads). Needs deskew-idm built in the collection (its IDM kernel and training features).
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from mnist_ann import Store
from mnist_ann.classify import vote
from mnist_ann.data.pipeline import apply_pipeline
from mnist_ann.evaluation.tune import HeldOut
from mnist_ann.index.neighbours import Neighbours, order_exactly
from mnist_ann.index.recipes import DESKEW_PCA, DIRECTIONS_PCA, DIRECTIONS_PIPELINE
from mnist_ann.runtime import faiss_threads

SPACES = {"deskew-pca (L2norm,PCA48)": (("deskew",), DESKEW_PCA),
          "directions (L2norm,PCA64)": (DIRECTIONS_PIPELINE, DIRECTIONS_PCA)}
POOLS = (25, 50, 100, 200)


def nearest(train_vectors: np.ndarray, queries: np.ndarray, transforms: str, held: HeldOut,
            k: int) -> Neighbours:
    """Each held-out row's k nearest other training rows, exactly, in the space."""
    index = faiss.index_factory(train_vectors.shape[1], f"{transforms},Flat")
    index.train(train_vectors)
    index.add(train_vectors)
    distances, rows = index.search(queries, held.searched(k))
    return held.drop(Neighbours(rows, distances), k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--held-out", type=int, default=None,
                        help="held-out training rows (default: all but one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    reranker = collection.searcher("deskew-idm")
    train = collection.train()
    held = HeldOut.draw(train, args.held_out or len(train) - 1, args.seed)
    queries, truth = train.pixels[held.rows], train.labels[held.rows]
    print(f"{args.collection}: {len(queries):,} held-out training rows (seed {args.seed}), "
          f"exact search in each space, IDM over its nearest with no gate, "
          f"{args.threads} threads")
    print("space                       candidates  k=1 errors  k=3 errors  k=3 accuracy")
    largest = max(POOLS)
    classes = np.unique(train.labels)
    for space, (steps, transforms) in SPACES.items():
        started = time.perf_counter()
        with faiss_threads(args.threads):
            vectors = apply_pipeline(steps, train.pixels)
            found = nearest(vectors, vectors[held.rows], transforms, held, largest)
            scores = reranker.pool_distances(queries, found.rows)

        def line(what: str, ranked: Neighbours, space: str = space) -> None:
            wrong = [int(np.count_nonzero(
                vote(train.labels[ranked.rows[:, :k]], ranked.distances[:, :k], classes)
                != truth))
                for k in (1, 3)]
            print(f"{space:<27} {what:<11} {wrong[0]:>10}  {wrong[1]:>10}  "
                  f"{1 - wrong[1] / len(truth):.4%}")

        line("itself", found)
        for pool in POOLS:
            line(f"IDM of {pool}", order_exactly(found.rows[:, :pool], scores[:, :pool], pool))
        print(f"  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
