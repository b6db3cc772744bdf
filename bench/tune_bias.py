"""Why tune searches a copy of the index: held-out recall measured three ways on pca-hnsw.

    python bench/tune_bias.py [--store indexes] [--collection seed] [--index pca-hnsw]

For 2,000 held-out training rows: (a) leave-one-out in the index itself (each row's own entry
dropped: what tune did before), (b) in a copy of the index built without the held-out rows
(what tune does now); and (c) 4,000 sampled test queries in the index itself, the unseen
queries a tuned setting is for. Recall@7 against exact search, at a grid of settings,
2 threads.
"""

from __future__ import annotations

import argparse

import numpy as np

from mnist_ann import Store
from mnist_ann.evaluation.metrics import recall
from mnist_ann.evaluation.tune import HeldOut, tuning_copy
from mnist_ann.index.recipes import grid_points
from mnist_ann.runtime import faiss_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--index", default="pca-hnsw")
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    train, test = collection.train(), collection.test()
    searcher, exact = collection.searcher(args.index), collection.exact_searcher(args.index)
    held = HeldOut.draw(train, 2000, 0)
    queries = train.pixels[held.rows]
    unseen = test.pixels[np.sort(np.random.default_rng(5).choice(len(test), 4000,
                                                                 replace=False))]
    print(f"# python bench/tune_bias.py --collection {args.collection} --index {args.index}")
    print("| setting | leave-one-out in the index | in a copy without them | test queries |")
    print("|---|---|---|---|")
    with faiss_threads(2):
        own_truth = held.drop(exact.search(queries, 8), 7)
        test_truth = exact.search(unseen, 7)
        copy, copy_exact, _ = tuning_copy(collection, args.index, held)
        copy_truth = copy_exact.search(queries, 7)
        grid = collection.indexes[args.index]["search_grid"]
        for params in grid_points(grid):
            loo = recall(held.drop(searcher.search(queries, 8, params), 7).distances,
                         own_truth.distances, 7)
            in_copy = recall(copy.search(queries, 7, params).distances, copy_truth.distances, 7)
            on_test = recall(searcher.search(unseen, 7, params).distances,
                             test_truth.distances, 7)
            print(f"| {params} | {loo:.4f} | {in_copy:.4f} | {on_test:.4f} |", flush=True)


if __name__ == "__main__":
    main()
