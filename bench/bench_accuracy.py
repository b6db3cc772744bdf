"""Accuracy and speed of raw flat, the deskew and directions recipes and deskew-idm, on the
seed and the standard split, with 1 and 2 threads, in one run; the published k-NN results
beside them.

    python bench/bench_accuracy.py [--store indexes] [--collections seed std]

Each collection must hold the indexes (`mnist-ann build --split standard --collection std
--index flat --index deskew-flat --index deskew-pca-ivf --index directions-ivf --index
deskew-idm`, and the same for
seed). Queries/s time the whole test set in one call (search, re-rank and vote, as `query`
reports), median of `--repeats`; every setting is the recipe's default, chosen without the
test set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mnist_ann import Store
from mnist_ann.machine import describe_machine

INDEXES = ("flat", "deskew-flat", "deskew-pca-ivf", "directions-ivf", "deskew-idm")
PUBLISHED = [  # error rates on the standard split, as their papers give them
    ("IDM, Keysers et al., IEEE PAMI 2007", 0.9946),
    ("P2DHMDM, Keysers et al., IEEE PAMI 2007", 0.9948),
    ("shape context, Belongie et al., IEEE PAMI 2002", 0.9937),
    ("tangent distance, Simard et al. 1993 (as LeCun lists it)", 0.989),
    ("k-NN L2, LeCun et al. 1998", 0.9691),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collections", nargs="+", default=["seed", "std"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    store = Store(args.store)
    print(f"machine: {json.dumps(describe_machine())}")
    print(f"{'collection':10} {'index':15} {'threads':>7} {'accuracy':>9} {'queries/s':>10}  "
          "settings")
    for name in args.collections:
        collection = store[name]
        test = collection.test()
        for index in INDEXES:
            if index not in collection.indexes:
                print(f"{name:10} {index:15}  (not built)")
                continue
            for threads in args.threads:
                classifier = collection.classifier(index, threads=threads)
                classifier.classify(test.pixels[:200])  # warm-up
                seconds, result = [], None
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    result = classifier.classify(test.pixels)
                    seconds.append(time.perf_counter() - started)
                accuracy = float((result.predictions == test.labels).mean())
                rate = len(test.pixels) / statistics.median(seconds)
                print(f"{name:10} {index:15} {threads:>7} {accuracy:>9.4%} {rate:>10,.0f}  "
                      f"k={classifier.k} {result.params}", flush=True)
    print("\npublished nearest-neighbour results on the standard split (accuracy):")
    for method, accuracy in PUBLISHED:
        print(f"  {accuracy:.2%}  {method}")


if __name__ == "__main__":
    main()
