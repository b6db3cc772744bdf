"""The full report on the seed collection, with scikit-learn and hnswlib in the same run.

    python bench/bench_report.py [--store indexes] [--collection seed] [--threads 2]

Sweeps every setting of every index (`report --full`), writes every report file under
bench/results/report/ and puts the operating-points table, with the machine it was measured
on, into bench/README.md between its RESULTS markers. Needs the collection built (`mnist-ann
build --split seed`) and, for the peer curve, `pip install '.[peers]'`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import click

from mnist_ann import Store
from mnist_ann.evaluation.sweep import SweepSettings, evaluate
from mnist_ann.render.report import POINT_COLUMNS, markdown_table, write_report
from mnist_ann.runtime import default_threads

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-queries", type=int, default=300)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    settings = SweepSettings(7, args.repeats, args.latency_queries, args.threads, full=True)
    out = HERE / "results" / "report"
    evaluation = evaluate(collection, settings=settings,
                          log=lambda message: print(message, file=sys.stderr),
                          progress=lambda label, n: click.progressbar(length=n, label=label,
                                                                     file=sys.stderr))
    write_report(out, evaluation)
    meta = evaluation.meta
    machine = meta["machine"]
    section = "\n".join([
        "<!-- RESULTS -->",
        f"Latest run: {meta['generated']}, {meta['seconds']:.0f} s in all, on "
        f"{machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
        f"({machine['faiss_simd']}), numpy {machine['numpy']} with {machine['blas']}, "
        f"scikit-learn {machine['scikit-learn']}; collection `{meta['collection']}`; "
        f"{meta['settings']['method']}.",
        "",
        markdown_table(evaluation.points, POINT_COLUMNS),
        "",
        "Every setting: [results/report/report.md](results/report/report.md).",
        "<!-- /RESULTS -->"])
    readme = HERE / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"<!-- RESULTS -->.*<!-- /RESULTS -->", re.S)
    text = pattern.sub(section, text) if pattern.search(text) else text + "\n" + section + "\n"
    readme.write_text(text)
    print(markdown_table(evaluation.points, POINT_COLUMNS))


if __name__ == "__main__":
    main()
