"""Queries unlike any digit: flat and exact-pca on random-noise images beside the seed test
digits, each search in a fresh process: seconds, queries/s and the peak RSS it added over the
loaded searcher; exact-pca's neighbour lists checked equal to flat's.

    python bench/bench_unlike.py [--store indexes] [--collection seed] [--noise 1000]
                                 [--threads 2] [--repeats 3]

Random noise spreads its energy over all 784 pixels, so PCA bounds prune nothing for it:
exact-pca hands such queries to a scan of every row, and verifies what its range searches find
a bounded batch at a time (README, "Queries unlike any digit").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mnist_ann.machine import describe_machine

# one search in a fresh process: prints its seconds, the peak RSS (MB) once the searcher is
# loaded and warmed on 100 test digits, and after the search; saves the neighbour rows
SEARCH = """
import resource, sys, time
import numpy as np
from mnist_ann import Store
from mnist_ann.runtime import faiss_threads
store, name, index, queries, out, threads = sys.argv[1:]
collection = Store(store)[name]
searcher = collection.searcher(index)
pixels = collection.test().pixels if queries == "test" else np.load(queries)
with faiss_threads(int(threads)):
    searcher.search(collection.test().pixels[:100], 7)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    found = searcher.search(pixels, 7)
    seconds = time.perf_counter() - started
np.save(out, found.rows)
print(seconds, loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="indexes")
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--noise", type=int, default=1000, help="random-noise images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    machine = describe_machine()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
          f"({machine['faiss_simd']}); {args.threads} threads; each search in a fresh process, "
          f"median of {args.repeats}")
    with tempfile.TemporaryDirectory() as scratch:
        noise = Path(scratch) / "noise.npy"
        np.save(noise, np.random.default_rng(0).integers(0, 256, (args.noise, 784),
                                                         dtype=np.uint8))
        print("\n| queries | index | seconds | queries/s | peak RSS added (MB) |")
        print("|---|---|---|---|---|")
        for queries, label in (("test", "seed test digits"), (str(noise), f"{args.noise:,} "
                                                                        "random-noise images")):
            rows = {}
            for index in ("flat", "exact-pca"):
                runs = []
                for repeat in range(args.repeats):
                    out = Path(scratch) / f"{index}-{repeat}.npy"
                    result = subprocess.run(
                        [sys.executable, "-c", SEARCH, args.store, args.collection, index,
                         queries, str(out), str(args.threads)],
                        capture_output=True, text=True, check=True)
                    runs.append([float(value) for value in result.stdout.split()])
                    rows[index] = np.load(out)
                seconds = statistics.median(run[0] for run in runs)
                added = statistics.median(run[2] - run[1] for run in runs)
                print(f"| {label} | {index} | {seconds:.2f} | {len(rows[index]) / seconds:,.0f} "
                      f"| {added:,.0f} |", flush=True)
            same = bool(np.array_equal(rows["flat"], rows["exact-pca"]))
            print(f"| {label} | exact-pca's lists = flat's | {json.dumps(same)} | | |")


if __name__ == "__main__":
    main()
