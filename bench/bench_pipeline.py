"""Feature pipelines on the seed split: deskew time, and pipeline indexes beside raw flat.

    python bench/bench_pipeline.py [--store indexes] [--collection seed] [--repeats 5]

1. Deskews the whole training set (and all 70,000 images) several times; prints the median.
2. With ONE thread, classifies the 14,000 test images with raw `flat` and with each built
   pipeline index at its default setting: batch throughput (median of the repeats, the
   pipeline included), accuracy, recall@7 in the index's own space against exact search
   there, and single-query p50/p99 latency over 1,000 queries; prints the throughput ratio to
   flat.
Builds the pipeline indexes into the collection when they are missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from mnist_ann import Store
from mnist_ann.data.pipeline import deskew
from mnist_ann.evaluation.metrics import accuracy, recall
from mnist_ann.evaluation.sweep import format_params
from mnist_ann.evaluation.timing import WARM_UP_QUERIES, time_batch, time_single_queries
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import resolve_recipe
from mnist_ann.machine import describe_machine
from mnist_ann.runtime import faiss_threads

PIPELINE_INDEXES = ("deskew-pca-ivf", "deskew-pca-hnsw")


def log(message: str) -> None:
    print(message, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-queries", type=int, default=1000)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    machine = describe_machine()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
          f"({machine['faiss_simd']}), numpy {machine['numpy']}")
    train, test = collection.train(), collection.test()

    everything = np.concatenate([train.pixels, test.pixels])
    for label, pixels in (("training set", train.pixels), ("all of MNIST", everything)):
        _, seconds = time_batch(lambda pixels=pixels: deskew(pixels), None, args.repeats)
        print(f"deskew {label} ({len(pixels):,} images), 1 thread: median "
              f"{statistics.median(seconds):.2f} s of {args.repeats} (target: under 10 s)")

    missing = [name for name in PIPELINE_INDEXES if name not in collection.indexes]
    if missing:
        log(f"building {', '.join(missing)}")
        build_indexes(collection, [resolve_recipe(name, len(train)) for name in missing],
                      log=log)
    rows = []
    flat_qps = None
    sample = test.pixels[np.random.default_rng(0).choice(len(test), args.latency_queries,
                                                         replace=False)]
    for name in ("flat", *PIPELINE_INDEXES):
        classifier = collection.classifier(name, k=7, threads=1)
        with faiss_threads(2):
            truth = collection.exact_searcher(name).search(test.pixels, 7)
        repeats = 1 if name == "flat" else args.repeats  # flat takes about 20 s a run
        result, times = time_batch(lambda c=classifier: c.classify(test.pixels),
                                   lambda c=classifier: c.classify(test.pixels[:WARM_UP_QUERIES]),
                                   repeats)
        latency = time_single_queries(classifier.classify, sample)
        qps = len(test) / statistics.median(times)
        flat_qps = flat_qps or qps
        rows.append((name, classifier.space, format_params(result.params),
                     accuracy(result.predictions, test.labels),
                     recall(result.neighbours.distances, truth.distances, 7), qps,
                     qps / flat_qps, latency["p50_ms"], latency["p99_ms"]))
    print("\none thread; batch = all 14,000 test images in one call, pipeline included")
    print("| index | space | params | accuracy | recall@7 (own space) | queries/s | vs flat | "
          "p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, space, params, acc, rec, qps, ratio, p50, p99 in rows:
        print(f"| {name} | {space} | {params} | {acc:.4%} | {rec:.4f} | {qps:,.0f} | "
              f"{ratio:.1f}x | {p50:.3f} | {p99:.3f} |")


if __name__ == "__main__":
    main()
