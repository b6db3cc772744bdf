"""Choose deskew-idm's k, pool and gate on held-out *training* rows (never the test set).

    python bench/choose_idm.py [--store indexes] [--collection seed] [--held-out 2000]

Each held-out training row is a query against the rest of the training set (leave-one-out:
its own row is dropped from its candidates). The deskew-pca-ivf stage of `deskew-idm` gives
each query its 201 nearest; IDM distances to the first 200 are computed once, then every
setting of k, pool and gate is scored from them. Prints the held-out accuracy of each and the
rule's choice: among settings whose IDM comparisons per query (the share of queries not
gated times the pool) stay within `--budget`, the best accuracy; among those within one
held-out error of it, the fewest comparisons, then the smallest k. The budget follows from
the speed target: an IDM comparison takes about 104 µs on one thread here, so 15 a query is
1.6 ms, which with the candidate stage keeps 2 threads above 1,000 queries/s.
"""

from __future__ import annotations

import argparse
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mnist_ann import Store
from mnist_ann.data.pipeline import deskew
from mnist_ann.index.idm import gradient_features, idm_distances
from mnist_ann.runtime import faiss_threads

KS, POOLS, GATES = (1, 3, 5, 7), (25, 50, 100, 200), (3, 5, 7, 10)


def vote(labels: np.ndarray) -> int:
    return int(np.bincount(labels, minlength=10).argmax())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nprobe", type=int, default=None,
                        help="the candidate stage's nprobe [default: the recipe's]")
    parser.add_argument("--budget", type=float, default=15.0,
                        help="most IDM comparisons a query may average")
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    train = collection.train()
    idm = collection.searcher("deskew-idm")
    rng = np.random.default_rng(0)
    held = np.sort(rng.choice(len(train.ids), args.held_out, replace=False))
    started = time.perf_counter()
    with faiss_threads(args.threads):
        base = {"candidates": max(POOLS) + 1}
        if args.nprobe:
            base["nprobe"] = args.nprobe
        found = idm.base.search(train.pixels[held], max(POOLS) + 1, base)
    rows = np.array([r[r != own][:max(POOLS)] for r, own in zip(found.rows, held, strict=True)])
    features = gradient_features(deskew(train.pixels[held]))

    def distances(i: int) -> np.ndarray:
        return idm_distances(features[i], idm.features, rows[i])

    with ThreadPoolExecutor(args.threads) as pool:
        scores = np.stack(list(pool.map(distances, range(len(held)))))
    print(f"{len(held)} held-out training rows of {args.collection!r}, IDM over 200 "
          f"candidates each in {time.perf_counter() - started:.1f} s")
    truth = train.labels[held]
    labels = train.labels[rows]
    results = []
    for k, size, gate in itertools.product(KS, POOLS, (*GATES, None)):
        gate = size if gate is None else gate
        if gate > size:
            continue
        correct = gated = 0
        for i in range(len(held)):
            first = labels[i, :gate]
            if (first == first[0]).all():
                gated += 1
                predicted = vote(labels[i, :k])
            else:
                order = np.lexsort((rows[i, :size], scores[i, :size]))[:k]
                predicted = vote(labels[i, order])
            correct += predicted == truth[i]
        cost = (1 - gated / len(held)) * size
        results.append((correct, k, size, gate, gated, cost))
    print("k  pool gate  held-out accuracy  gated  IDM comparisons a query")
    for correct, k, size, gate, gated, cost in sorted(results, key=lambda r: -r[0])[:20]:
        print(f"{k:<2} {size:>4} {gate:>4}  {correct / len(held):.4f} ({correct})  "
              f"{gated / len(held):5.1%}  {cost:6.1f}")
    affordable = [r for r in results if r[5] <= args.budget]
    best = max(r[0] for r in affordable)
    near = [r for r in affordable if r[0] >= best - 1]
    chosen = min(near, key=lambda r: (r[5], r[1]))
    print(f"chosen within {args.budget:g} comparisons a query: k={chosen[1]} pool={chosen[2]} "
          f"gate={chosen[3]} (held-out accuracy {chosen[0] / len(held):.4f}, "
          f"{chosen[4] / len(held):.1%} of queries gated, {chosen[5]:.1f} comparisons a "
          f"query); the best without a budget: {max(r[0] for r in results) / len(held):.4f}")


if __name__ == "__main__":
    main()
