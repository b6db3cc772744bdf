"""Certified-exact search against flat, FAISS's own exact pruning (Panorama) and
scikit-learn's predict, same run, same threads.

    python bench/bench_exact.py [--store indexes] [--collection seed] [--threads 2]

Classifies the 14,000 test images of the seed split with scikit-learn's
KNeighborsClassifier(n_neighbors=7).predict (the study's method), mnist-ann `flat`, FAISS's
`IndexFlatL2Panorama` (after a full PCA rotation, as it needs; levels 8/16/32 and batch sizes
128/512/2048 swept once, the fastest exact one timed with the others), and mnist-ann
`exact-pca` at each number of components. A Panorama setting counts only if every neighbour
list equals flat's; exact-pca must equal flat's in lists, distances and predictions. Prints
throughput (median of --repeats runs, flat, Panorama and exact-pca interleaved; one run for
scikit-learn), the ratios, and how much exact-pca scanned and verified per query.
Then single queries: the first --single test images one at a time on one thread, through
flat and exact-pca (each method's queries in turn, twice), p50 and p99 of the per-query
times, exact-pca's lists equal to flat's. Builds exact-pca into the collection when it is
missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from mnist_ann import Store
from mnist_ann.api import Collection
from mnist_ann.classify import Classifier
from mnist_ann.evaluation.baselines import PanoramaSearcher, full_rotation
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
    parser.add_argument("--levels", default="8,16,32", help="Panorama levels swept")
    parser.add_argument("--batch-sizes", default="128,512,2048", help="Panorama batch sizes")
    parser.add_argument("--single", type=int, default=1000, help="single queries timed")
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    train, test = collection.train(), collection.test()
    if "exact-pca" not in collection.indexes:
        build_indexes(collection, [resolve_recipe("exact-pca", len(train))], log=log)
    machine = describe_machine()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
          f"({machine['faiss_simd']}), mnist-ann kernels {machine['kernels']}, numpy "
          f"{machine['numpy']}, scikit-learn {machine['scikit-learn']}; {args.threads} threads "
          "for every method; "
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
    flat_lists = flat.classify(test.pixels).neighbours.rows
    space = collection.searcher("flat").space
    log("FAISS Panorama sweep (one timed run each)")
    sweep, best = [], None
    rotation = full_rotation(space)
    for levels in map(int, args.levels.split(",")):
        for batch_size in map(int, args.batch_sizes.split(",")):
            panorama = Classifier(PanoramaSearcher(space, levels, batch_size, rotation),
                                  train.labels, k=7, threads=args.threads)
            panorama.classify(test.pixels[:WARM_UP_QUERIES])
            result = panorama.classify(test.pixels)
            exact = bool(np.array_equal(result.neighbours.rows, flat_lists))
            sweep.append((levels, batch_size, len(test) / result.seconds, exact))
            log(f"  levels={levels} batch={batch_size}: {sweep[-1][2]:,.0f} queries/s, "
                f"lists equal flat's: {exact}")
            if exact and (best is None or sweep[-1][2] > best[2]):
                best = (*sweep[-1][:3], panorama)
            del panorama
    print("\nFAISS Panorama sweep (one run each): " + "; ".join(
        f"levels={lv} batch={bs}: {qps:,.0f} q/s{'' if ok else ' (NOT exact)'}"
        for lv, bs, qps, ok in sweep))
    panorama_label = f"levels={best[0]} batch={best[1]}" if best else None
    settings = [("flat", flat)] + ([(panorama_label, best[3])] if best else []) + [
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
    pruned = 1 if best else 0
    if best:
        if not np.array_equal(results[1].neighbours.rows, flat_result.neighbours.rows):
            raise SystemExit(f"Panorama {panorama_label} differs from flat")
        rows.append(("FAISS IndexFlatL2Panorama, PCA784 rotation (lists = flat's: True)",
                     panorama_label, statistics.median(seconds[1]), None))
        panorama_seconds = statistics.median(seconds[1])
    for (label, _), result, times in zip(settings[1 + pruned:], results[1 + pruned:],
                                         seconds[1 + pruned:], strict=True):
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
    print("| method | setting | seconds | queries/s | vs scikit-learn | vs flat | vs Panorama "
          "| lists scanned median | verified median | verified p99 | queries scanning every "
          "list |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, setting, median_seconds, stats in rows:
        figures = ([f"{stats['lists_scanned_median']:.0f} of {stats['lists']}",
                    f"{stats['verified_median']:,.0f}", f"{stats['verified_p99']:,.0f}",
                    f"{stats['fallback_queries']:,}"] if stats else ["", "", "", ""])
        print(f"| {name} | {setting} | {median_seconds:.2f} | {len(test) / median_seconds:,.0f}"
              f" | {sklearn_seconds / median_seconds:.1f}x | {flat_seconds / median_seconds:.1f}x"
              f" | {f'{panorama_seconds / median_seconds:.1f}x' if best else '-'}"
              f" | {' | '.join(figures)} |")
    single_queries(collection, test.pixels[:args.single])


def single_queries(collection: Collection, pixels: np.ndarray) -> None:
    """p50 and p99 of one-query-at-a-time search, one thread, flat and exact-pca."""
    log(f"single queries: {len(pixels):,} one at a time, one thread")
    classifiers = {name: collection.classifier(name, threads=1)
                   for name in ("flat", "exact-pca")}
    times: dict[str, list[float]] = {name: [] for name in classifiers}
    rows: dict[str, np.ndarray] = {}
    for classifier in classifiers.values():
        classifier.neighbours(pixels[:3])  # warm-up: the single-query layout is made here
    for _ in range(2):
        for name, classifier in classifiers.items():
            found = []
            for i in range(len(pixels)):
                start = time.perf_counter()
                found.append(classifier.neighbours(pixels[i:i + 1]).rows)
                times[name].append(time.perf_counter() - start)
            rows[name] = np.concatenate(found)
    if not np.array_equal(rows["exact-pca"], rows["flat"]):
        raise SystemExit("exact-pca's single-query lists differ from flat's")
    print(f"\nsingle queries (batches of 1, one thread, {len(pixels):,} queries twice; "
          "exact-pca's lists = flat's: True)\n")
    print("| method | p50 ms | p99 ms |\n|---|---|---|")
    for name, seconds in times.items():
        p50, p99 = np.percentile(np.array(seconds) * 1e3, [50, 99])
        print(f"| mnist-ann {name} | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
