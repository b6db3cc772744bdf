"""scikit-learn's predict (the original study's method) against our flat query, in one run.

    python bench/bench_query.py [--store indexes] [--collection seed] [--repeats 3]

Both use the same threads (FAISS's OpenMP and scikit-learn's OpenMP and BLAS pools), runs
interleaved. Prints the median wall time of each, the throughput ratio, and whether all
predictions are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from mnist_ann import Store
from mnist_ann.evaluation.timing import time_batch
from mnist_ann.machine import describe_machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    train, test = collection.train(), collection.test()
    flat = collection.classifier("flat", k=7, threads=args.threads)
    times: dict[str, list[float]] = {"scikit-learn predict": [], "mnist-ann flat": []}
    with threadpool_limits(args.threads):
        model = KNeighborsClassifier(n_neighbors=7).fit(train.pixels.astype(np.float64),
                                                        train.labels)
        queries64 = test.pixels.astype(np.float64)
        for repeat in range(args.repeats):
            expected, [seconds] = time_batch(lambda: model.predict(queries64), None, 1)
            times["scikit-learn predict"].append(seconds)
            ours = flat.classify(test.pixels)  # its own time: search and vote
            times["mnist-ann flat"].append(ours.seconds)
            print(f"repeat {repeat + 1}: scikit-learn {seconds:.2f} s, flat {ours.seconds:.2f} s",
                  file=sys.stderr)
    identical = bool(np.array_equal(expected, ours.predictions))
    n = len(test)
    rows = {name: {"median_s": statistics.median(seconds), "best_s": min(seconds),
                   "qps": n / statistics.median(seconds)} for name, seconds in times.items()}
    ratio = rows["scikit-learn predict"]["median_s"] / rows["mnist-ann flat"]["median_s"]
    report = {"machine": describe_machine(), "threads": args.threads, "queries": n,
              "repeats": args.repeats, "results": rows, "throughput_ratio": ratio,
              "accuracy": float(np.mean(ours.predictions == test.labels)),
              "identical_predictions": identical}
    for name, row in rows.items():
        print(f"{name:22s} median {row['median_s']:7.2f} s  best {row['best_s']:7.2f} s  "
              f"{row['qps']:8.0f} queries/s")
    print(f"throughput ratio (flat / scikit-learn): {ratio:.2f}x; identical predictions: "
          f"{identical}; accuracy {report['accuracy']}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
