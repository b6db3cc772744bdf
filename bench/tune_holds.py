"""Do tuned settings hold on unseen queries? `tune --recall R` on every approximate index of
a collection, then each index's recall@7 on the test set at the setting tune recorded,
against exact search in the index's own ranking space.

    python bench/tune_holds.py [--store indexes] [--collection seed] [--recall 0.999]
        [--held-out 5000] [--threads 2]

Tune reads only training rows (held out, searched in a copy of the index built without
them, chosen by a 99% lower confidence bound); the test set is read here afterwards, once
per index, to check the choice. Indexes tune cannot serve (flat, certified, re-ranked) are
skipped. Records each choice in the collection, as `mnist-ann tune` does.
"""

from __future__ import annotations

import argparse
import sys

from mnist_ann import Store
from mnist_ann.errors import MnistAnnError
from mnist_ann.evaluation.metrics import recall
from mnist_ann.evaluation.sweep import format_params
from mnist_ann.evaluation.tune import Target, tune_index
from mnist_ann.machine import describe_machine
from mnist_ann.runtime import faiss_threads


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--recall", type=float, default=0.999)
    parser.add_argument("--held-out", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--index", action="append", default=None,
                        help="only these indexes (default: every approximate one)")
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    names = args.index or [name for name, entry in collection.indexes.items()
                           if entry.get("search_grid") and not entry.get("certified")
                           and not entry.get("rerank") and int(entry.get("shards", 1)) == 1]
    machine = describe_machine()
    print(f"# python bench/tune_holds.py --collection {args.collection} --recall {args.recall} "
          f"--held-out {args.held_out} --threads {args.threads}  ({machine['cpu']}, "
          f"{machine['cores']} cores, faiss {machine['faiss']})")
    print("| index | tuned setting | held-out recall | its 99% lower bound | test recall "
          f"| test ≥ {args.recall} |")
    print("|---|---|---|---|---|---|")
    test = collection.test().pixels
    held = True
    for name in names:
        try:
            result = tune_index(collection, name, Target("recall", args.recall),
                                held_out=args.held_out, threads=args.threads, repeats=1,
                                log=log)
        except MnistAnnError as exc:
            held = False
            print(f"| {name} | not reached: {exc} | | | | NO |", flush=True)
            continue
        chosen = result["chosen"]
        searcher, exact = collection.searcher(name), collection.exact_searcher(name)
        with faiss_threads(args.threads):
            truth = exact.search(test, 7)
            found = searcher.search(test, 7)  # at the default tune just recorded
        measured = recall(found.distances, truth.distances, 7)
        held &= measured >= args.recall
        print(f"| {name} | {format_params(searcher.parameters())} | {chosen['recall']:.4f} | "
              f"{chosen['recall_bound']:.4f} | {measured:.4f} | "
              f"{'yes' if measured >= args.recall else 'NO'} |", flush=True)
    print(f"\nevery tuned setting held on the test set: {held}")


if __name__ == "__main__":
    main()
