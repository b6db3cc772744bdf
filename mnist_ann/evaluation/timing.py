"""The timing harness every measurement uses: the report, tune and the bench scripts.

Batches run after a warm-up, repeated, each run's wall time kept (the caller takes the
median); single queries run one at a time after a short warm-up. Both stop early once a time
budget is spent, so that slow settings do not take a whole run's time. Side-by-side benches
interleave their runs round by round, so that a changing load falls on all of them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from mnist_ann.evaluation.metrics import latency_summary

MIN_LATENCY_QUERIES = 30
WARM_UP_QUERIES = 500


def time_batch(run: Callable[[], object], warm_up: Callable[[], object] | None, repeats: int,
               budget_seconds: float = float("inf")) -> tuple[object, list[float]]:
    """Result of `run` and the wall times of up to `repeats` runs after a warm-up.

    Runs stop early once `budget_seconds` are spent (at least one always runs).
    """
    if warm_up is not None:
        warm_up()
    times: list[float] = []
    result = None
    while len(times) < repeats and (not times or sum(times) < budget_seconds):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return result, times


def time_interleaved(runs: Mapping[str, Callable[[], object]],
                     rounds: int) -> tuple[dict[str, object], dict[str, list[float]]]:
    """Each run's last result and its wall times over `rounds` rounds, every run once a
    round, in turn (warm-ups are the caller's)."""
    results: dict[str, object] = {}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - started)
    return results, seconds


def time_single_queries(run_one: Callable[[np.ndarray], object], queries: np.ndarray,
                        budget_seconds: float = float("inf"),
                        minimum: int = MIN_LATENCY_QUERIES) -> dict:
    """Per-query latency percentiles, one query at a time, after a short warm-up.

    Stops early once `budget_seconds` are spent, after at least `minimum` queries.
    """
    for query in queries[:5]:
        run_one(query[None, :])
    seconds = []
    spent = 0.0
    for query in queries:
        started = time.perf_counter()
        run_one(query[None, :])
        seconds.append(time.perf_counter() - started)
        spent += seconds[-1]
        if spent > budget_seconds and len(seconds) >= minimum:
            break
    return {**latency_summary(np.array(seconds)), "latency_queries": len(seconds),
            "single_queries_per_second": len(seconds) / sum(seconds)}
