"""Certified-exact search against flat and scikit-learn's predict, same run, same threads.

    python bench/bench_exact.py [--store indexes] [--collection seed] [--threads 2]

Classifies the 14,000 test images of the seed split with scikit-learn's
KNeighborsClassifier(n_neighbors=7).predict (the study's method), mnist-ann `flat`, and
mnist-ann `exact-pca` at each number of components; checks that every neighbour list and
prediction of exact-pca equals flat's, and prints throughput (median of --repeats runs, flat
and exact-pca interleaved; one run for scikit-learn), the ratios, and how much exact-pca
scanned and verified per query.
Builds exact-pca into the collection when it is missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from mnist_ann import Store
from mnist_ann.evaluation.timing import WARM_UP_QUERIES, time_batch
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import resolve_recipe
from mnist_ann.machine import describe_machine
from mnist_ann.runtime import default_threads


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    train, test = collection.train(), collection.test()
    if "exact-pca" not in collection.indexes:
        build_indexes(collection, [resolve_recipe("exact-pca", len(train))], log=log)
    machine = describe_machine()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
          f"({machine['faiss_simd']}), numpy {machine['numpy']}, scikit-learn "
          f"{machine['scikit-learn']}; {args.threads} threads for every method; "
          f"{len(test):,} queries, k=7")

    log("scikit-learn predict (one run)")
    with threadpool_limits(args.threads):
        model = KNeighborsClassifier(n_neighbors=7).fit(train.pixels.astype(np.float64),
                                                        train.labels)
        queries64 = test.pixels.astype(np.float64)
        sklearn_predictions, [sklearn_seconds] = time_batch(lambda: model.predict(queries64),
                                                            None, 1)
    rows = [("scikit-learn predict", "-", sklearn_seconds, None)]

    flat = collection.classifier("flat", threads=args.threads)
    settings = [("flat", flat)] + [
        (f"components={components}",
         collection.classifier("exact-pca", params={"components": components},
                               threads=args.threads))
        for components in collection.indexes["exact-pca"]["search_grid"]["components"]]
    for _, classifier in settings:
        classifier.classify(test.pixels[:WARM_UP_QUERIES])
    # interleaved, so that the machine's load changes alike for flat and exact-pca
    seconds: list[list[float]] = [[] for _ in settings]
    results: list = [None] * len(settings)
    for repeat in range(args.repeats):
        for i, (label, classifier) in enumerate(settings):
            log(f"run {repeat + 1}/{args.repeats}: {label}")
            results[i] = classifier.classify(test.pixels)
            seconds[i].append(results[i].seconds)
    flat_result, flat_seconds = results[0], statistics.median(seconds[0])
    assert np.array_equal(flat_result.predictions, sklearn_predictions)
    rows.append(("mnist-ann flat", "-", flat_seconds, None))
    for (label, _), result, times in zip(settings[1:], results[1:], seconds[1:], strict=True):
        same = (np.array_equal(result.neighbours.rows, flat_result.neighbours.rows)
                and np.array_equal(result.neighbours.distances,
                                   flat_result.neighbours.distances)
                and np.array_equal(result.predictions, flat_result.predictions))
        if not same:
            raise SystemExit(f"exact-pca {label} differs from flat")
        rows.append((f"mnist-ann exact-pca (neighbours = flat's: {same})", label,
                     statistics.median(times), result.stats))
    accuracy = float(np.mean(flat_result.predictions == test.labels))
    print(f"\naccuracy of every row: {accuracy!r} (exact-pca and flat: identical neighbour "
          "lists, distances and predictions for all queries)\n")
    print("| method | setting | seconds | queries/s | vs scikit-learn | vs flat | lists scanned "
          "median | verified median | verified p99 | queries scanning every list |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, setting, median_seconds, stats in rows:
        figures = ([f"{stats['lists_scanned_median']:.0f} of {stats['lists']}",
                    f"{stats['verified_median']:,.0f}", f"{stats['verified_p99']:,.0f}",
                    f"{stats['fallback_queries']:,}"] if stats else ["", "", "", ""])
        print(f"| {name} | {setting} | {median_seconds:.2f} | {len(test) / median_seconds:,.0f}"
              f" | {sklearn_seconds / median_seconds:.1f}x | {flat_seconds / median_seconds:.1f}x"
              f" | {' | '.join(figures)} |")


if __name__ == "__main__":
    main()
