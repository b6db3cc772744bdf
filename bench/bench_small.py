"""Small enough for a phone: the compressed recipes' memory, accuracy and one-thread speed
beside flat and deskew-pca-ivf, on the seed split, in one run; the issue's size targets.

    python bench/bench_small.py [--store indexes] [--collection seed] [--repeats 5]

Each index must be built (`mnist-ann build --index flat --index deskew-pca-ivf --index
deskew-pca-sq8 --index deskew-pca-pq`). Memory is `resident_bytes` (index file, one byte a
label, and the training pixels where the ranking reads them); the model file is what
`mnist-ann export` writes. Accuracy is on every test query at the index's default setting
(chosen on training rows); queries/s time the whole test set in one call with one thread
(pipeline, search and vote, as `query` reports), interleaved round by round, median of
`--repeats`, and its ratio to flat's in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from mnist_ann import Store
from mnist_ann.evaluation.timing import time_interleaved
from mnist_ann.machine import describe_machine
from mnist_ann.model import export_model
from mnist_ann.store.collection import resident_bytes

INDEXES = ("flat", "deskew-pca-ivf", "deskew-pca-sq8", "deskew-pca-pq")
TARGETS = [(4e6, 0.985), (1e6, 0.975)]  # (bytes, accuracy) each at ≥ 10,000 queries/s
MIN_RATE = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    test = collection.test()
    n_train = len(collection.train())
    names = [name for name in INDEXES if name in collection.indexes]
    classifiers = {name: collection.classifier(name, threads=1) for name in names}
    for classifier in classifiers.values():
        classifier.classify(test.pixels[:500])  # warm-up
    results, seconds = time_interleaved(
        {name: lambda c=classifier: c.classify(test.pixels)
         for name, classifier in classifiers.items()}, args.repeats)
    print(f"# python bench/bench_small.py --collection {args.collection} --repeats "
          f"{args.repeats}")
    print(f"# machine: {json.dumps(describe_machine())}")
    print("| index | memory (MB) | model file (MB) | accuracy | queries/s, 1 thread | vs flat "
          "| setting |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            memory = resident_bytes(collection.indexes[name], n_train)
            model = Path(folder) / f"{name}.model"
            export_model(collection, name, model)
            accuracy = float((results[name].predictions == test.labels).mean())
            rate = len(test.pixels) / statistics.median(seconds[name])
            ratios = [f / s for f, s in zip(seconds["flat"], seconds[name], strict=True)] \
                if "flat" in seconds else [float("nan")]
            rows.append((name, memory, accuracy, rate))
            print(f"| {name} | {memory / 1e6:,.2f} | {model.stat().st_size / 1e6:,.2f} | "
                  f"{accuracy:.2%} | {rate:,.0f} | {statistics.median(ratios):,.1f}x | "
                  f"{results[name].params or '-'} |", flush=True)
    print()
    for budget, floor in TARGETS:
        fitting = [row for row in rows if row[1] <= budget]
        best = max(fitting, key=lambda row: row[2], default=None)
        met = best is not None and best[2] >= floor and best[3] >= MIN_RATE
        described = (f"{best[0]}: {best[2]:.2%} at {best[3]:,.0f} queries/s" if best
                     else "nothing fits")
        print(f"target ≥ {floor:.1%} within {budget / 1e6:g} MB at ≥ {MIN_RATE:,} queries/s: "
              f"{'met' if met else 'MISSED'} ({described})")


if __name__ == "__main__":
    main()
