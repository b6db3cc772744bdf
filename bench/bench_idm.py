"""The IDM kernel's speed: the vectorised numpy version against the compiled (numba) box-sum
kernel, interleaved in one run, on real deskewed digits of a collection, one thread.

    python bench/bench_idm.py [--store indexes] [--collection seed] [--rounds 15]

Both are checked against each other on the same comparisons before they are timed (and
against the plain definition in tests/test_idm.py). Prints each one's median time a
comparison and the median ratio of the rounds.
"""

from __future__ import annotations

import argparse

import numpy as np

from mnist_ann import Store
from mnist_ann.data.pipeline import deskew
from mnist_ann.evaluation.timing import time_interleaved
from mnist_ann.index.idm import WARP, _idm_numpy, fast_kernel, gradient_features, idm_distances

COMPARISONS = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if fast_kernel() is None:
        raise SystemExit("numba is not installed: pip install 'mnist-ann[fast]'")
    collection = Store(args.store)[args.collection]
    train = gradient_features(deskew(collection.train_rows(0, COMPARISONS).pixels))
    query = gradient_features(deskew(collection.test().pixels[:1]))[0]
    rows = np.arange(COMPARISONS)
    numpy_scores = _idm_numpy(query, train, WARP)
    np.testing.assert_allclose(idm_distances(query, train, rows), numpy_scores, rtol=1e-5)
    _, seconds = time_interleaved({"numpy": lambda: _idm_numpy(query, train, WARP),
                                   "numba": lambda: idm_distances(query, train, rows)},
                                  args.rounds)
    times = {name: [t / COMPARISONS * 1e6 for t in values] for name, values in seconds.items()}
    ratio = np.median(np.array(times["numpy"]) / np.array(times["numba"]))
    print(f"IDM, {COMPARISONS} comparisons of one '{args.collection}' test digit, 1 thread, "
          f"median of {args.rounds} interleaved rounds")
    for name, values in times.items():
        print(f"{name:6s} {np.median(values):8.1f} µs a comparison")
    print(f"numba is {ratio:.1f}x numpy")


if __name__ == "__main__":
    main()
