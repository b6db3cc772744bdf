"""The full report on the seed collection, with scikit-learn and hnswlib in the same run.

    python bench/bench_report.py [--store indexes] [--collection seed] [--threads 2]

Writes every report file under bench/results/report/ and puts the operating-points table,
with the machine it was measured on, into bench/README.md between its RESULTS markers.
Needs the collection built (`mnist-ann build --split seed`) and, for the peer curve,
`pip install '.[peers]'`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import click

from mnist_ann.build import default_threads
from mnist_ann.report import POINT_COLUMNS, SweepSettings, markdown_table, run_report
from mnist_ann.store import Collection, resolve_store

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-queries", type=int, default=300)
    args = parser.parse_args()
    collection = Collection.open(resolve_store(args.store), args.collection)
    settings = SweepSettings(7, args.repeats, args.latency_queries, args.threads)
    out = HERE / "results" / "report"
    report = run_report(collection, out, settings=settings,
                        log=lambda message: print(message, file=sys.stderr),
                        progress=lambda label, n: click.progressbar(length=n, label=label,
                                                                   file=sys.stderr))
    machine = report.meta["machine"]
    section = "\n".join([
        "<!-- RESULTS -->",
        f"Latest run: {report.meta['generated']}, {report.meta['seconds']:.0f} s in all, on "
        f"{machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
        f"({machine['faiss_simd']}), numpy {machine['numpy']} with {machine['blas']}, "
        f"scikit-learn {machine['scikit-learn']}; collection `{report.meta['collection']}`; "
        f"{report.meta['settings']['method']}.",
        "",
        markdown_table(report.points, POINT_COLUMNS),
        "",
        "Every setting: [results/report/report.md](results/report/report.md).",
        "<!-- /RESULTS -->"])
    readme = HERE / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"<!-- RESULTS -->.*<!-- /RESULTS -->", re.S)
    text = pattern.sub(section, text) if pattern.search(text) else text + "\n" + section + "\n"
    readme.write_text(text)
    print(markdown_table(report.points, POINT_COLUMNS))


if __name__ == "__main__":
    main()
