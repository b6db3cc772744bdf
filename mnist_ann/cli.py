"""The `mnist-ann` command: click options over the library, nothing more.

Only click and the light modules are imported here; each command imports what it uses, so
that `mnist-ann --help` does not pay for FAISS, pyarrow or scikit-learn.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mnist_ann import __version__
from mnist_ann.classify import WEIGHTS
from mnist_ann.data.mnist import SPLIT_KINDS, Split, load_mnist, validate_source
from mnist_ann.errors import InvalidArgument, MnistAnnError
from mnist_ann.index.recipes import BUILTIN, DEFAULT_RECIPES, resolve_recipe
from mnist_ann.runtime import no_progress


def one_line(exc: BaseException) -> str:
    """What went wrong, on one line, with what to do about it."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        code = exc.errno
        if code is None:  # pyarrow's I/O errors carry it in their text
            found = re.search(r"\[errno (\d+)\]", str(exc))
            code = int(found.group(1)) if found else None
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return (f"{where}{exc.strerror or os.strerror(code)} (the disk is full, or a "
                    "file-size limit was reached); nothing was changed: free some space and "
                    "run it again")
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, MemoryError):
        return ("out of memory; nothing was changed: use fewer queries at once, a smaller "
                "index, or a machine with more memory")
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, RuntimeError):  # FAISS's C++ errors come through as RuntimeError
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else text
        return f"FAISS refused: {last}; check the index and its parameters"
    return (f"unexpected {type(exc).__name__}: {text}; run it again with `mnist-ann --debug "
            "...` for the traceback, and please report it")


class Commands(click.Group):
    """The command group: every error a command raises ends as one line on stderr (exit 2
    for a usage error, 1 for the rest), or, with --debug, as the full traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except InvalidArgument as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.UsageError(str(exc)) from exc
        except MnistAnnError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(" ".join(str(exc).split())) from exc
        except Exception as exc:  # a user's input should never end in a traceback
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(one_line(exc)) from exc


def stderr_log(quiet: bool) -> Callable[[str], None]:
    if quiet:
        return lambda message: None
    return lambda message: click.echo(message, err=True)


def emit(data: Any, as_json: bool, render: Callable[[Any], str] | None = None) -> None:
    """Print a summary on stdout, as JSON or as text."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif render is not None:
        click.echo(render(data))
    else:
        click.echo("\n".join(f"{key}: {value}" for key, value in data.items()))


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(cell[i]) for cell in cells])
              for i, column in enumerate(columns)]
    lines = [[*columns], *cells]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines)


store_option = click.option(
    "--store", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Folder of collections [default: $MNIST_ANN_STORE or ./indexes].")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="FAISS threads [default: the cores this process may use].")
cluster_option = click.option(
    "--cluster", default=None, metavar="local:W|tcp://HOST:PORT",
    help="Work on a Dask cluster: W local worker processes, or a running scheduler whose "
         "workers see the store at the same path (pip install 'mnist-ann[distributed]').")


def progress_bars(quiet: bool) -> Callable[[str, int], Any]:
    if quiet:
        return no_progress
    return lambda label, length: click.progressbar(length=length, label=label, file=sys.stderr)


def source_callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return validate_source(value)
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


source_option = click.option(
    "--source", default="auto", show_default=True, callback=source_callback,
    help="Where MNIST comes from: auto (cache, else openml, else pypi), openml, pypi, idx:DIR.")


def open_collection(store: Path | None, name: str):  # -> api.Collection
    from mnist_ann.api import Store

    return Store(store)[name]


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mnist-ann")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """k-nearest-neighbour digit recognition on exact and approximate FAISS indexes."""
    ctx.obj = {"debug": debug}


@main.command()
@source_option
@click.option("--refresh", is_flag=True, help="Read the source even if the cache has the data.")
@quiet_option
@json_option
def fetch(source: str, refresh: bool, quiet: bool, as_json: bool) -> None:
    """Fetch canonical MNIST-70k, check its fingerprint and cache it."""
    dataset = load_mnist(source, refresh=refresh, log=stderr_log(quiet))
    emit({"source": dataset.source, "cached": dataset.from_cache, "rows": len(dataset.labels),
          "fingerprint": dataset.fingerprint}, as_json)


@main.command()
@click.option("--split", "split_kind", type=click.Choice(SPLIT_KINDS), default=None,
              help="seed: the study's random 80/20 split; standard: first 60,000 / last "
                   "10,000 [default: seed, or the existing collection's split].")
@click.option("--test-size", type=float, default=None,
              help="Fraction of rows held out for testing (seed split) [default: 0.2].")
@click.option("--random-state", type=int, default=None,
              help="Seed of the random split [default: 42].")
@click.option("--augment", type=click.IntRange(0, 100), default=0,
              help="Add this many deformed copies of every training digit (a smooth random "
                   "displacement and a one-pixel shift; the test set is untouched) "
                   "[default: none].")
@click.option("--augment-seed", type=int, default=None,
              help="Seed of the deformed copies [default: 0]; the same seed gives the same "
                   "training table.")
@click.option("--collection", "collection_name", default=None,
              help="Collection name [default: the split's name].")
@click.option("--index", "index_specs", multiple=True, metavar="RECIPE|NAME=FACTORY",
              help=f"Index to build: a recipe ({', '.join(BUILTIN)}) or NAME=FACTORY with "
                   "any FAISS factory string; repeatable [default: flat, ivf, hnsw].")
@click.option("--force", is_flag=True, help="Rebuild indexes that are already current.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the training rows into this many contiguous ranges, one index file "
                   "each (trained once, then filled per shard); searches merge them exactly.")
@cluster_option
@threads_option
@source_option
@store_option
@quiet_option
@json_option
def build(split_kind: str | None, test_size: float | None, random_state: int | None,
          augment: int, augment_seed: int | None,
          collection_name: str | None, index_specs: tuple[str, ...], force: bool,
          shards: int, cluster: str | None, threads: int | None, source: str,
          store: Path | None, quiet: bool, as_json: bool) -> None:
    """Write a split of MNIST as a collection and build its FAISS indexes."""
    from mnist_ann.cluster import check_cluster, connected
    from mnist_ann.index.build import build_indexes
    from mnist_ann.index.recipes import with_shards
    from mnist_ann.store.collection import resolve_store
    from mnist_ann.store.manage import ensure_collection

    log = stderr_log(quiet)
    split_given = (split_kind, test_size, random_state, augment_seed) != (None,) * 4 or augment
    split = Split.make(split_kind or "seed", test_size, random_state, augment, augment_seed)
    specs = index_specs or DEFAULT_RECIPES
    n_train = split.train_rows()
    for spec in specs:  # refuse a bad recipe before anything is fetched or written
        with_shards(resolve_recipe(spec, n_train), shards)
    if cluster is not None:
        check_cluster(cluster)
        if shards == 1:
            raise click.UsageError("--cluster builds the shards of --shards N (N ≥ 2)")
    store_path = resolve_store(store)
    name = collection_name or split.default_name
    collection = ensure_collection(store_path, name, split, source, log,
                                   must_match=split_given)
    recipes = [with_shards(resolve_recipe(spec, collection.manifest["rows"]["train"]), shards)
               for spec in specs]
    with connected(cluster, log) as client:
        fill = None if client is None else client.fill_shards
        results = build_indexes(collection, recipes, threads, force, log, progress_bars(quiet),
                                fill)
    rows = [{"index": r.name, "status": r.status, "factory": r.entry["factory"],
             "ntotal": r.entry["ntotal"], "build_seconds": r.entry["build_seconds"],
             "megabytes": round(r.entry["bytes"] / 1e6, 1)} for r in results]
    if as_json:
        emit({"collection": collection.summary(), "indexes": rows}, True)
    else:
        click.echo(format_table(rows, list(rows[0])))


@main.command()
@click.argument("name")
@store_option
@quiet_option
def upgrade(name: str, store: Path | None, quiet: bool) -> None:
    """Rewrite an older collection's tables in the current schema, keeping its indexes."""
    from mnist_ann.store.collection import resolve_store
    from mnist_ann.store.manage import upgrade_collection

    upgraded = upgrade_collection(resolve_store(store), name, stderr_log(quiet))
    click.echo(f"{name}: {'upgraded to' if upgraded else 'already has'} the current schema")


def render_collection(summary: dict) -> str:
    lines = [f"collection {summary['name']} ({summary['path']})",
             f"  split: {summary['split']}",
             f"  rows: {summary['rows']['train']:,} train / {summary['rows']['test']:,} test",
             f"  source: {summary['source']}"]
    for filename in ("train.parquet", "test.parquet"):
        lines.append(f"  {filename}: {summary['files'][filename]['bytes'] / 1e6:.1f} MB")
    for name, entry in summary["indexes"].items():
        steps = " → ".join([*(entry.get("pipeline") or []), entry["factory"]])
        shards = f" in {entry['shards']} shards" if entry.get("shards", 1) > 1 else ""
        lines.append(f"  index {name}: {steps} ({entry['recipe']}), "
                     f"{entry['ntotal']:,} vectors{shards}, {entry['bytes'] / 1e6:.1f} MB, "
                     "built in "
                     f"{entry['build_seconds']:.1f} s with {entry['threads']} threads "
                     f"[{entry['file']}]")
    return "\n".join(lines)


def parse_params(ctx: click.Context, param: click.Parameter,
                 values: tuple[str, ...]) -> dict[str, str]:
    parsed = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name or not setting:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE (e.g. efSearch=64)", ctx, param)
        parsed[name] = setting
    return parsed


collection_option = click.option("--collection", "collection_name", default="seed",
                                  show_default=True, help="Collection in the store.")
k_option = click.option("-k", "k", type=int, default=7, show_default=True,
                        help="Neighbours that vote.")
param_option = click.option("--param", "params", multiple=True, callback=parse_params,
                            metavar="NAME=VALUE",
                            help="Search parameter, e.g. efSearch=64 or nprobe=16; repeatable "
                                 "[default: the recipe's].")

normalize_option = click.option(
    "--normalize", "normalize_mode", default="auto", show_default=True,
    type=click.Choice(("auto", "photo", "canvas", "mnist", "none")),
    help="How images become MNIST-style 28x28: photo (paper: lighting, threshold, specks), "
         "canvas (a drawing), mnist (box and centring only), none; auto passes a 28x28 "
         "white-on-black image unchanged and normalises anything else.")

query_k_option = click.option("-k", "k", type=int, default=None,
                              help="Neighbours that vote [default: the index's, chosen with "
                                   "it (deskew-idm), else 7].")


@main.command()
@collection_option
@click.option("--index", "index_name", default="flat", show_default=True,
              help="Index of the collection to search.")
@query_k_option
@param_option
@click.option("--weights", type=click.Choice(WEIGHTS), default="uniform", show_default=True,
              help="uniform: plurality vote; distance: votes weighted by 1/distance.")
@click.option("--input", "input_path", type=click.Path(exists=True, path_type=Path),
              default=None, help="Parquet table, .npy uint8 [n,784] or [n,28,28], IDX image "
                                 "file, or an image (PNG, JPEG, WEBP) or folder of them "
                                 "[default: the collection's test table].")
@normalize_option
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False,
                                                          path_type=Path),
              default=None, help="IDX label file for an IDX image --input.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write predictions here (.parquet or .csv).")
@click.option("--confusion", "confusion_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the confusion-matrix heatmap here (PNG).")
@cluster_option
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Classify with this exported model file alone (mnist-ann "
                                 "export), without a store; needs --input.")
@click.option("--reject-below", "reject_below", type=click.FloatRange(0, 1), default=None,
              help="Reject predictions whose confidence (the winner's share of the vote; for "
                   "deskew-idm, drawn from its re-ranked pool) is under this; the summary "
                   "gains coverage and accepted_accuracy.")
@threads_option
@store_option
@quiet_option
@json_option
def query(collection_name: str, index_name: str, k: int, params: dict, weights: str,
          input_path: Path | None, normalize_mode: str, labels_path: Path | None,
          output_path: Path | None,
          confusion_path: Path | None, cluster: str | None, model_path: Path | None,
          reject_below: float | None, threads: int | None, store: Path | None, quiet: bool,
          as_json: bool) -> None:
    """Classify images by a vote of their k nearest neighbours in an index."""
    from mnist_ann.cluster import check_cluster, connected
    from mnist_ann.data.queries import Queries, check_output_path, read_queries

    log = stderr_log(quiet)
    if output_path is not None:
        check_output_path(output_path)
    if model_path is not None:
        given = [f"--{name}" for name in ("collection", "index", "store", "cluster")
                 if click.get_current_context().get_parameter_source(
                     {"collection": "collection_name", "index": "index_name"}.get(name, name))
                 == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--model classifies from the model file alone: drop "
                                   f"{', '.join(given)}")
        if input_path is None:
            raise click.UsageError("--model needs --input (a model file holds no test set)")
    if model_path is None:
        collection = open_collection(store, collection_name)
    if input_path is None:
        queries = Queries.from_table(collection.test(), f"{collection_name}/test.parquet")
    else:
        queries = read_queries(input_path, labels_path, normalize_mode)
    if confusion_path is not None and queries.labels is None:
        raise click.UsageError("--confusion needs labelled queries")
    if cluster is not None:
        check_cluster(cluster)
    with connected(cluster, log) as client:
        started = time.perf_counter()
        if model_path is None:
            log(f"loading index {index_name!r} of {collection_name!r} (checksum verified)")
            classifier = collection.classifier(index_name, k=k, params=params,
                                               weights=weights, threads=threads,
                                               cluster=client)
            factory = collection.indexes[index_name]["factory"]
        else:
            from mnist_ann.model import read_model

            log(f"loading the model {model_path} (checksum verified)")
            model = read_model(model_path)
            classifier = model.classifier(k=k, params=params, weights=weights,
                                          threads=threads)
            collection_name, index_name = None, model.name
            factory = model.entry["factory"]
        load_seconds = time.perf_counter() - started
        log(f"classifying {len(queries.pixels):,} images"
            + (f" on the cluster {cluster}" if cluster else ""))
        result = classifier.classify(queries.pixels)
    summary = {"input": queries.description, "n": len(queries.pixels), "k": classifier.k,
               "collection": collection_name, "index": index_name, "factory": factory,
               "space": classifier.space, "params": result.params, "weights": weights,
               "load_seconds": round(load_seconds, 4), "seconds": round(result.seconds, 4),
               "queries_per_second": round(result.queries_per_second, 1),
               "threads": result.threads}
    if result.stats:
        summary[getattr(classifier.searcher, "stats_name", "certified")] = result.stats
    if queries.labels is not None:
        correct = int((result.predictions == queries.labels).sum())
        summary |= {"accuracy": correct / len(queries.labels), "correct": correct}
    rejected = None
    if reject_below is not None:
        from mnist_ann.evaluation.metrics import rejection

        summary |= rejection(result.confidence, result.predictions, queries.labels,
                             reject_below)
        rejected = result.confidence < reject_below
    if output_path is not None:
        from mnist_ann.data.queries import write_predictions

        write_predictions(output_path, queries, result.predictions, result.neighbour_ids,
                          result.neighbours.distances, result.confidence, rejected)
        log(f"predictions written to {output_path}")
    if confusion_path is not None:
        from mnist_ann.evaluation.metrics import confusion_matrix
        from mnist_ann.render.plots import confusion_heatmap

        matrix = confusion_matrix(queries.labels, result.predictions, len(classifier.classes))
        confusion_heatmap(matrix, confusion_path, f"{collection_name} / {index_name}, k={k}: "
                                                  f"accuracy {summary['accuracy']:.4f}")
        log(f"confusion matrix written to {confusion_path}")
    emit(summary, as_json)


@main.command()
@collection_option
@click.option("--index", "index_names", multiple=True,
              help="Index to sweep; repeatable [default: every index of the collection].")
@k_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reports"), show_default=True, help="Folder for the report files.")
@click.option("--full", is_flag=True,
              help="Sweep every setting of each recipe's grid [default: a focused part of "
                   "it, a few values of each parameter].")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Measure a seeded sample of this many test queries [default: all].")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed batch runs per setting (after one warm-up); the median is reported.")
@click.option("--latency-queries", type=click.IntRange(min=1), default=300, show_default=True,
              help="Queries timed one at a time, with one thread, per setting.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Measure scikit-learn's KNeighborsClassifier (the study's method).")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="Measure hnswlib when it is installed (pip install '.[peers]').")
@click.option("--whole-set-queries", type=click.IntRange(min=0), default=10,
              show_default=True,
              help="Re-ranked indexes (deskew-idm): sampled queries compared with every "
                   "training row by the re-rank distance, to check its recall (0: skip).")
@cluster_option
@threads_option
@store_option
@quiet_option
@json_option
def report(collection_name: str, index_names: tuple[str, ...], k: int, out: Path, full: bool,
           sample: int | None, repeats: int, latency_queries: int, baseline: bool, peers: bool,
           whole_set_queries: int, cluster: str | None, threads: int | None,
           store: Path | None, quiet: bool, as_json: bool) -> None:
    """Sweep each index's search grid: recall, accuracy and speed, with plots and HTML."""
    from mnist_ann.cluster import check_cluster, connected
    from mnist_ann.evaluation.sweep import SweepSettings, evaluate, plan
    from mnist_ann.render.report import POINT_COLUMNS, format_cell, write_report
    from mnist_ann.runtime import check_threads
    from mnist_ann.store.collection import ensure_writable

    collection = open_collection(store, collection_name)
    settings = SweepSettings(k, repeats, latency_queries, check_threads(threads), full, sample,
                             whole_set_queries=whole_set_queries)
    names = plan(collection, list(index_names) or None, settings)
    if cluster is not None:
        check_cluster(cluster)
        if not any(int(collection.indexes[name].get("shards", 1)) > 1 for name in names):
            raise click.UsageError("--cluster searches sharded indexes (built with --shards "
                                   "N), and none of these is")
    ensure_writable(out)
    with connected(cluster, stderr_log(quiet)) as client:
        evaluation = evaluate(collection, names, settings, baseline, peers, stderr_log(quiet),
                              progress_bars(quiet), client)
    write_report(out, evaluation)
    if as_json:
        emit({"out": str(out), "operating_points": evaluation.points,
              "rejection_points": evaluation.rejections,
              "rerank_checks": evaluation.rerank_checks, "meta": evaluation.meta}, True)
        return
    click.echo(format_table(
        [{key: format_cell(point[key]) for key in POINT_COLUMNS} for point in evaluation.points],
        POINT_COLUMNS))
    click.echo(f"\nreport written to {out / 'report.html'} (and report.md, results.csv, "
               "results.json, plots)")


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10,
              "mib": 2**20, "gib": 2**30}


class ByteSize(click.ParamType):
    """A size such as 4MB, 500kB, 1.5GiB or 1000000 (bytes): MB is 10⁶ bytes, MiB 2²⁰."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match and match[2].lower()
        if match is None or unit not in SIZE_UNITS or float(match[1]) <= 0:
            self.fail(f"{value!r} is not a size: give a positive number with B, kB, MB, GB, "
                      "KiB, MiB or GiB, e.g. 4MB", param, ctx)
        return int(float(match[1]) * SIZE_UNITS[unit])


@main.command()
@collection_option
@click.option("--index", "index_names", multiple=True,
              help="Index of the collection to tune (one; with --max-memory, the indexes to "
                   "choose among, repeatable [default: every built index]).")
@click.option("--recall", "recall_target", type=click.FloatRange(0, 1, min_open=True),
              default=None, help="Target: recall@k at least this, e.g. 0.99.")
@click.option("--accuracy-within", type=click.FloatRange(0, 1), default=None,
              help="Target: accuracy within this of exact search's, e.g. 0.001.")
@click.option("--budget", type=click.FloatRange(0, min_open=True), default=None,
              help="Target for a re-ranked index (deskew-idm): the most accurate k, pool and "
                   "gate whose re-ranks average at most this many comparisons a query (k is "
                   "chosen, so -k does not apply).")
@click.option("--max-memory", type=ByteSize(), default=None,
              help="Target: the most accurate index and setting whose index file, labels and "
                   "the training features it reads fit this size, e.g. 4MB; recorded as that "
                   "index's default.")
@k_option
@click.option("--held-out", type=click.IntRange(min=10), default=None,
              help="Training rows held out and searched (the test set is never read); "
                   "default 5,000, or a tenth of a smaller training set (a re-ranked "
                   "index, tuned leave-one-out: 20,000, or a third).")
@click.option("--held-out-gap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Re-ranked indexes: also leave out of a held-out row's neighbours every "
                   "row within this many MNIST ids (runs by one writer), for a test set of "
                   "other writers such as the standard split's; e.g. 500.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the held-out sample.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per setting; the median counts.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads while timing each setting.")
@store_option
@quiet_option
@json_option
def tune(collection_name: str, index_names: tuple[str, ...], recall_target: float | None,
         accuracy_within: float | None, budget: float | None, max_memory: int | None, k: int,
         held_out: int | None, held_out_gap: int,
         seed: int, repeats: int, threads: int, store: Path | None, quiet: bool,
         as_json: bool) -> None:
    """Record the fastest search setting that meets a target as the index's default (for a
    re-ranked index: the most accurate k, pool and gate within a budget)."""
    from mnist_ann.evaluation.sweep import format_params
    from mnist_ann.evaluation.tune import Target, tune_index, tune_memory
    from mnist_ann.render.report import format_cell

    targets = [Target(kind, value) for kind, value in (
        ("recall", recall_target), ("accuracy", accuracy_within), ("budget", budget),
        ("memory", max_memory)) if value is not None]
    if len(targets) != 1:
        raise click.UsageError("give exactly one target: --recall R, --accuracy-within D, "
                               "--max-memory SIZE or (for a re-ranked index) --budget N")
    target = targets[0]
    if target.kind != "memory" and len(index_names) != 1:
        raise click.UsageError("give the index to tune: --index NAME (several only with "
                               "--max-memory)")
    if held_out_gap and target.kind != "budget":
        raise click.UsageError("--held-out-gap is for a re-ranked index's --budget tune")
    collection = open_collection(store, collection_name)
    if target.kind == "memory":
        result = tune_memory(collection, max_memory, list(index_names), k, held_out, seed,
                             threads, repeats, stderr_log(quiet), progress_bars(quiet))
    else:
        result = tune_index(collection, index_names[0], target, k, held_out, seed, threads,
                            repeats, stderr_log(quiet), progress_bars(quiet),
                            gap=held_out_gap)
    index_name = result["index"]
    if as_json:
        emit(result, True)
        return
    columns = result["columns"]
    rows = [{**{key: format_cell(row[key]) for key in columns},
             "params": format_params(row["params"])} for row in result["measured"]]
    click.echo(format_table(rows, columns))
    if "exact_accuracy" in result:
        there = f"exact accuracy there {result['exact_accuracy']:.4f}"
    elif "resident_bytes" in result:
        there = f"it needs {result['resident_bytes'] / 1e6:,.2f} MB"
    else:
        there = f"the best without a budget {result['best_unbounded_accuracy']:.4f}"
    click.echo(f"\n{index_name}: default is now {format_params(result['chosen']['params'])} "
               f"({target.describe()} on {result['held_out']:,} held-out training rows; {there})")
    if "margin" in result:
        click.echo(f"margin: {result['margin']}")


@main.command()
@collection_option
@click.option("--index", "index_name", required=True, help="Index of the collection to export.")
@click.option("--out", "out_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The model file to write (replaced whole, never half-written).")
@store_option
@quiet_option
@json_option
def export(collection_name: str, index_name: str, out_path: Path, store: Path | None,
           quiet: bool, as_json: bool) -> None:
    """Write one self-contained, checksummed model file (index, labels, pipeline, search
    defaults) that `query --model` classifies with, without a store."""
    from mnist_ann.model import export_model
    from mnist_ann.store.collection import resident_bytes

    if out_path.parent and not out_path.parent.is_dir():
        raise click.UsageError(f"--out {out_path}: its folder does not exist")
    collection = open_collection(store, collection_name)
    header = export_model(collection, index_name, out_path)
    summary = {"out": str(out_path), "bytes": out_path.stat().st_size, "index": index_name,
               "collection": collection_name, "factory": header["entry"]["factory"],
               "k": header["k"], "search_defaults": header["entry"]["search_defaults"],
               "sections": header["sections"],
               "resident_bytes": resident_bytes(header["entry"], header["rows"])}
    stderr_log(quiet)(f"model written to {out_path} ({summary['bytes'] / 1e6:,.2f} MB)")
    emit(summary, as_json)


@main.command()
@click.argument("names", nargs=-1)
@store_option
@json_option
def info(names: tuple[str, ...], store: Path | None, as_json: bool) -> None:
    """List the collections in the store with their split, rows, files and indexes."""
    from mnist_ann.store.collection import Collection, list_collections, resolve_store

    store_path = resolve_store(store)
    collections = ([Collection.open(store_path, name) for name in names] if names
                   else list_collections(store_path))
    summaries = [collection.summary() for collection in collections]
    if as_json:
        emit(summaries, True)
    elif not summaries:
        click.echo(f"no collections in {store_path}; create one with `mnist-ann build`", err=True)
    else:
        click.echo("\n\n".join(render_collection(summary) for summary in summaries))


@main.command()
@click.argument("names", nargs=-1)
@store_option
@json_option
def verify(names: tuple[str, ...], store: Path | None, as_json: bool) -> None:
    """Check every file of the collections against their manifests and build records."""
    from mnist_ann.store.collection import (
        MANIFEST,
        Collection,
        collection_names,
        resolve_store,
        validate_name,
    )

    store_path = resolve_store(store)
    names = names or tuple(collection_names(store_path))
    if not names:
        raise click.ClickException(f"no collections in {store_path}; create one with "
                                   "`mnist-ann build`")
    for name in names:
        validate_name(name)
    report = []
    for name in names:
        try:
            collection = Collection.open(store_path, name)
        except MnistAnnError as exc:  # the manifest itself is unusable
            report.append({"collection": name, "files": 0, "problems": [
                {"file": MANIFEST, "problem": " ".join(str(exc).split()), "remedy": None}]})
            continue
        report.append({"collection": name, "files": len(collection.manifest["files"]),
                       "problems": collection.problems()})
    if as_json:
        emit(report, True)
    else:
        for item in report:
            click.echo(f"{item['collection']}: {item['files']} files, "
                       f"{len(item['problems']) or 'no'} problem"
                       f"{'' if len(item['problems']) == 1 else 's'}")
            for problem in item["problems"]:
                remedy = f"; {problem['remedy']}" if problem["remedy"] else ""
                click.echo(f"  {problem['file']}: {problem['problem']}{remedy}")
    bad = [p["file"] for item in report for p in item["problems"]]
    if bad:
        raise click.ClickException(f"{len(bad)} file{' fails' if len(bad) == 1 else 's fail'} "
                                   f"verification: {', '.join(bad)}")


@main.command()
@click.argument("name")
@click.option("--index", "index_name", default=None,
              help="Drop only this index (its file and build record) [default: the whole "
                   "collection].")
@store_option
@quiet_option
def drop(name: str, index_name: str | None, store: Path | None, quiet: bool) -> None:
    """Remove a collection, or one of its indexes, and its files."""
    from mnist_ann.store.collection import Collection, resolve_store
    from mnist_ann.store.manage import drop_collection, drop_index

    store_path = resolve_store(store)
    if index_name is None:
        root = drop_collection(store_path, name, stderr_log(quiet))
        click.echo(f"dropped collection {name!r} ({root})")
        return
    removed = drop_index(Collection.open(store_path, name), index_name, stderr_log(quiet))
    click.echo(f"dropped index {index_name!r} of {name!r} ({', '.join(removed)})")


@main.command()
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(0, 69_999))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG file to write.")
@click.option("--columns", type=click.IntRange(1, 50), default=10, show_default=True)
@source_option
@quiet_option
def show(ids: tuple[int, ...], out: Path, columns: int, source: str, quiet: bool) -> None:
    """Save a grid of MNIST-70k rows IDS with their labels as a PNG."""
    from mnist_ann.render.plots import digit_grid

    dataset = load_mnist(source, log=stderr_log(quiet))
    rows = list(ids)
    digit_grid(dataset.images[rows], [f"#{i}: {dataset.labels[i]}" for i in rows], out, columns)
    click.echo(str(out))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the 28x28 PNGs and before-after.png (made if missing).")
@normalize_option
@quiet_option
@json_option
def normalize(images: tuple[Path, ...], out: Path, normalize_mode: str, quiet: bool,
              as_json: bool) -> None:
    """Make images (files or folders of PNG, JPEG, WEBP) MNIST-style 28x28 digits: writes
    each as OUT/NAME.png, a before-after grid, and prints what was done to each."""
    import numpy as np

    from mnist_ann.data.images import png_bytes
    from mnist_ann.data.normalize import image_files, normalize_grey, read_grey
    from mnist_ann.fileio import write_bytes
    from mnist_ann.render.plots import before_after_grid

    log = stderr_log(quiet)
    files = image_files(list(images))
    read = [read_grey(path, str(path)) for path in files]  # each decoded once, for both uses
    results = [normalize_grey(grey, alpha, normalize_mode, str(path))
               for path, (grey, alpha) in zip(files, read, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path, result in zip(files, results, strict=True):
        target = out / f"{path.stem}.png"
        write_bytes(target, png_bytes(result.pixels))
        records.append({"file": str(path), "out": str(target), **result.record})
    before_after_grid([grey for grey, _ in read],
                      np.stack([r.pixels for r in results]), [p.name for p in files],
                      out / "before-after.png")
    log(f"{len(files)} images normalised into {out}; look at {out / 'before-after.png'}")
    if as_json:
        emit(records, True)
    else:
        for record in records:
            click.echo(json.dumps(record))


@main.command()
@collection_option
@click.option("--index", "index_names", multiple=True, default=("flat",), show_default=True,
              help="Index to serve; repeatable (the first is the default).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="FAISS threads per search (requests run side by side; one is fastest).")
@click.option("--gather/--no-gather", default=True, show_default=True,
              help="Search concurrent requests to an exhaustive index (flat) together.")
@store_option
@quiet_option
def serve(collection_name: str, index_names: tuple[str, ...], host: str, port: int,
          threads: int, gather: bool, store: Path | None, quiet: bool) -> None:
    """Serve classification over HTTP: a JSON API, a page to draw digits on, API docs."""
    try:
        import uvicorn

        from mnist_ann.serve.app import create_app
    except ImportError as exc:
        raise MnistAnnError(f"serve needs the optional extra: pip install 'mnist-ann[serve]' "
                            f"({exc.name} is missing)") from None
    from mnist_ann.serve.service import ClassifyService

    log = stderr_log(quiet)
    collection = open_collection(store, collection_name)
    log(f"loading {', '.join(index_names)} of {collection_name!r} (checksums verified)")
    service = ClassifyService(collection, index_names, threads, gather)
    log(f"serving on http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(create_app(service), host=host, port=port,
                log_level="warning" if quiet else "info", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1:])
