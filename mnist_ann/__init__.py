"""mnist-ann: k-nearest-neighbour digit recognition on exact and approximate FAISS indexes.

    from mnist_ann import Store, KNeighborsClassifier
    seed = Store()["seed"]
    clf = seed.classifier("hnsw", k=7, params={"efSearch": 64}, threads=2)
    clf.predict(X)

Names are imported on first use, so that `import mnist_ann` (and `mnist-ann --help`) stays
light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "Store": "mnist_ann.api",
    "Collection": "mnist_ann.api",
    "Classifier": "mnist_ann.classify",
    "Classification": "mnist_ann.classify",
    "KNeighborsClassifier": "mnist_ann.estimator",
    "Neighbours": "mnist_ann.index.neighbours",
    "RankingSpace": "mnist_ann.index.space",
    "Searcher": "mnist_ann.index.searchers",
    "MnistAnnError": "mnist_ann.errors",
    "InvalidArgument": "mnist_ann.errors",
    "DataError": "mnist_ann.errors",
    "IntegrityError": "mnist_ann.errors",
    "load_mnist": "mnist_ann.data.mnist",
    "read_model": "mnist_ann.model",
}
__all__ = ["Classification", "Classifier", "Collection", "DataError", "IntegrityError",
           "InvalidArgument", "KNeighborsClassifier", "MnistAnnError", "Neighbours",
           "RankingSpace", "Searcher", "Store", "load_mnist", "read_model"]

if TYPE_CHECKING:
    from mnist_ann.api import Collection, Store
    from mnist_ann.classify import Classification, Classifier
    from mnist_ann.data.mnist import load_mnist
    from mnist_ann.errors import DataError, IntegrityError, InvalidArgument, MnistAnnError
    from mnist_ann.estimator import KNeighborsClassifier
    from mnist_ann.index.neighbours import Neighbours
    from mnist_ann.index.searchers import Searcher
    from mnist_ann.index.space import RankingSpace
    from mnist_ann.model import read_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mnist_ann' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
