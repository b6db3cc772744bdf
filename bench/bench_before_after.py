"""Search speed on this revision against an older one, runs interleaved, in one run.

    python bench/bench_before_after.py --before 49521b3 [--store indexes] [--repeats 3]

The older revision is checked out into a temporary worktree and builds its own seed
collection in its own format (the same split, the same recipes) from the same MNIST cache.
Then, for each case, a fresh process of each revision loads the index, warms up on 500
queries and classifies the 14,000 test queries three times; the two alternate --repeats
times. Prints each side's median and the ratio: a ratio near 1 means the figures quoted for
the older revision still hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_load import ROOT, checked_out, log, old_collection

from mnist_ann import Store
from mnist_ann.machine import describe_machine

CASES = [("pca-hnsw", {"efSearch": 64, "candidates": 64}, 1),
         ("exact-pca", {"components": 32}, 2), ("exact-pca", {"components": 64}, 2),
         ("exact-pca", {"components": 128}, 2), ("deskew-pca-ivf", {}, 1),
         ("hnsw", {"efSearch": 64}, 1), ("ivf", {"nprobe": 32}, 1), ("flat", {}, 2)]
OLD = """
import json, sys
from pathlib import Path
from mnist_ann.search import KnnIndex
from mnist_ann.store import Collection
collection = Collection.open(Path(sys.argv[1]), "seed")
queries = collection.test().pixels
name, params, threads = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
knn = KnnIndex(collection, name)
knn.classify(queries[:500], 7, params, threads=threads)
print(json.dumps([knn.classify(queries, 7, params, threads=threads).seconds for _ in range(3)]))
"""
NEW = """
import json, sys
from mnist_ann import Store
collection = Store(sys.argv[1])["seed"]
queries = collection.test().pixels
name, params, threads = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
classifier = collection.classifier(name, params=params, threads=threads)
classifier.classify(queries[:500])
print(json.dumps([classifier.classify(queries).seconds for _ in range(3)]))
"""


def seconds(script: str, package: Path, store: Path, case: tuple) -> list[float]:
    name, params, threads = case
    done = subprocess.run([sys.executable, "-c", script, str(store), name, json.dumps(params),
                           str(threads)], capture_output=True, text=True, cwd=package,
                          env={"PYTHONPATH": str(package), "PATH": "/usr/bin:/bin",
                               "HOME": str(Path.home())}, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed in {package}: {done.stderr[-400:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--before", required=True, help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    collection = Store(args.store)["seed"]
    store = collection.root.parent.resolve()
    cases = [case for case in CASES if case[0] in collection.indexes]
    machine = describe_machine()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
          f"({machine['faiss_simd']}), numpy {machine['numpy']}; the 14,000 seed test "
          f"queries; fresh processes alternating, {args.repeats} each, 3 timed runs a process")
    with tempfile.TemporaryDirectory(prefix="bench-before-after-") as scratch, \
            checked_out(args.before, Path(scratch)) as worktree:
        old_store = Path(scratch) / "store"
        log(f"{args.before}: building its own seed collection")
        old_collection(worktree, old_store, "seed", collection.manifest["split"],
                       sorted({name for name, _, _ in cases}))
        print("\n| index | params | threads | before s | now s | before / now |")
        print("|---|---|---|---|---|---|")
        for case in cases:
            before, now = [], []
            for _ in range(args.repeats):
                log(f"{case[0]} {case[1]}")
                before += seconds(OLD, worktree, old_store, case)
                now += seconds(NEW, ROOT, store, case)
            b, n = statistics.median(before), statistics.median(now)
            print(f"| {case[0]} | {json.dumps(case[1])} | {case[2]} | {b:.3f} | {n:.3f} | "
                  f"{b / n:.2f} |", flush=True)

if __name__ == "__main__":
    main()
