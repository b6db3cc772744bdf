"""The locality order's gain: each index searched with it and without it, same run.

    python bench/bench_locality.py [--store indexes] [--collection seed] [--rounds 7]
                                   [--index NAME ...]

For each built index of the collection among --index (default: hnsw, ivf, pca-hnsw,
deskew-pca-ivf, deskew-pca-sq8), ONE thread, the whole test set in one call at the index's
default setting: the searcher as it is (a batch sorted by nearest landmark, results given
back in the order asked) and a copy of it with the order switched off, timed in --rounds
interleaved rounds after a warm-up. Checks that both give the same neighbours, then prints
each side's median queries/s and the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import numpy as np

from mnist_ann import Store
from mnist_ann.evaluation.timing import time_interleaved
from mnist_ann.machine import describe_machine
from mnist_ann.runtime import faiss_threads

INDEXES = ("hnsw", "ivf", "pca-hnsw", "deskew-pca-ivf", "deskew-pca-sq8")
K = 7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--index", action="append", help="an index to time (repeatable)")
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    queries = collection.test().pixels
    names = [name for name in (args.index or INDEXES) if name in collection.indexes]
    missing = sorted(set(args.index or INDEXES) - set(names))
    if missing:
        print(f"not built, skipped: {', '.join(missing)}", file=sys.stderr)
    machine = describe_machine()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
          f"({machine['faiss_simd']}), numpy {machine['numpy']}; ONE thread; "
          f"{len(queries):,} queries in one call, k={K}, {args.rounds} interleaved rounds\n")
    print("| index | setting | in locality order q/s | as given q/s | ratio (range) |")
    print("|---|---|---|---|---|")
    with faiss_threads(1):
        for name in names:
            ordered = collection.searcher(name)
            if getattr(ordered, "query_order", None) is None:
                print(f"| {name} | | no locality order (not HNSW or IVF) | | |")
                continue
            as_given = copy.copy(ordered)
            as_given.query_order = None
            runs = {"ordered": lambda s=ordered: s.search(queries, K),
                    "as given": lambda s=as_given: s.search(queries, K)}
            warm = {label: run() for label, run in runs.items()}
            if not (np.array_equal(warm["ordered"].rows, warm["as given"].rows)
                    and np.array_equal(warm["ordered"].distances, warm["as given"].distances)):
                raise SystemExit(f"{name}: the locality order changed the neighbours")
            _, seconds = time_interleaved(runs, args.rounds)
            ratios = [g / o for o, g in zip(seconds["ordered"], seconds["as given"],
                                            strict=True)]
            qps = {label: len(queries) / statistics.median(times)
                   for label, times in seconds.items()}
            print(f"| {name} | {ordered.parameters()} | {qps['ordered']:,.0f} | "
                  f"{qps['as given']:,.0f} | {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
