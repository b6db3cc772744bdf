"""`KNeighborsClassifier`: the same search as a scikit-learn estimator, fitted in memory.

    from mnist_ann import KNeighborsClassifier
    model = KNeighborsClassifier(n_neighbors=7, index="hnsw").fit(X_train, y_train)
    model.predict(X_test); model.predict_proba(X_test); model.score(X_test, y_test)

It works on any numeric X [n, d] and any labels y. Small integers (pixels) rank exactly in
integers, so with `index="flat"` its predictions equal scikit-learn's exactly; other data
ranks in float64. `index` is a recipe name (flat, ivf, hnsw, pca-hnsw, exact-pca, ...) or any
FAISS factory string.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from mnist_ann.classify import WEIGHTS, Classifier
from mnist_ann.errors import InvalidArgument
from mnist_ann.index.build import build_in_memory
from mnist_ann.index.factory import make_searcher
from mnist_ann.index.recipes import BUILTIN, Recipe, custom_recipe, resolve_recipe
from mnist_ann.index.searchers import space_transforms
from mnist_ann.index.space import RankingSpace, image_space, pixel_queries, vector_space
from mnist_ann.runtime import check_threads


class KNeighborsClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour vote over a FAISS index built in memory.

    Parameters
    ----------
    n_neighbors : neighbours that vote (the study's 7).
    index : a recipe name or a FAISS factory string ("HNSW32", "IVF64,Flat", ...).
    weights : "uniform" (plurality, ties to the smallest label) or "distance" (1/distance).
    params : search parameters (efSearch, nprobe, candidates, components), the recipe's
        defaults otherwise.
    threads : FAISS threads for fit and search [default: the cores this process may use].
    """

    def __init__(self, n_neighbors: int = 7, *, index: str = "flat", weights: str = "uniform",
                 params: dict | None = None, threads: int | None = None) -> None:
        self.n_neighbors = n_neighbors
        self.index = index
        self.weights = weights
        self.params = params
        self.threads = threads

    def _recipe(self, n_train: int, dimension: int) -> Recipe:
        if not isinstance(self.index, str) or not self.index:
            raise InvalidArgument(f"index must be a recipe name or a FAISS factory string, not "
                                  f"{self.index!r}")
        if self.index in BUILTIN or "=" in self.index:
            return resolve_recipe(self.index, n_train, dimension)
        return custom_recipe("custom", self.index, dimension)

    def _check_settings(self) -> None:
        if isinstance(self.n_neighbors, bool) or not isinstance(self.n_neighbors,
                                                                int | np.integer) \
                or self.n_neighbors < 1:
            raise InvalidArgument(f"n_neighbors must be a whole number of at least 1, not "
                                  f"{self.n_neighbors!r}")
        if self.weights not in WEIGHTS:
            raise InvalidArgument(f"weights must be one of {', '.join(WEIGHTS)}, not "
                                  f"{self.weights!r}")
        check_threads(self.threads)

    def fit(self, X: object, y: object) -> KNeighborsClassifier:
        """Build the index over X [n, d] with labels y [n]."""
        self._check_settings()
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        recipe = self._recipe(*X.shape)
        self.recipe_ = recipe.name
        if recipe.pipeline:
            train = pixel_queries(X)
            from mnist_ann.data.pipeline import apply_pipeline

            vectors = apply_pipeline(recipe.pipeline, train)
        else:
            train = X
            vectors = None
        space = None if recipe.pipeline else vector_space(train)
        index = build_in_memory(recipe, space.float32 if space is not None else vectors,
                                self.threads)
        self._fitted = {"train": space.features if space is not None else train,
                        "labels": encoded, "index": index}
        self.n_samples_fit_ = len(X)
        self._assemble(space)
        return self

    def _assemble(self, space: RankingSpace | None = None) -> None:
        """The searcher and classifier over the fitted index and training rows."""
        recipe = self._recipe(self.n_samples_fit_, self.n_features_in_)
        index, train = self._fitted["index"], self._fitted["train"]
        if space is None:
            space = (image_space("pixels", recipe.pipeline, space_transforms(recipe, index),
                                 train, owner=index) if recipe.pipeline
                     else vector_space(train))
        searcher = make_searcher(recipe, index, space)
        self.classifier_ = Classifier(searcher, self._fitted["labels"],
                                      k=min(self.n_neighbors, self.n_samples_fit_),
                                      params=self.params, weights=self.weights,
                                      threads=self.threads)

    def _queries(self, X: object) -> np.ndarray:
        check_is_fitted(self)
        if self.n_neighbors > self.n_samples_fit_:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = "
                             f"{self.n_neighbors}, n_samples_fit = {self.n_samples_fit_}")
        return validate_data(self, X, reset=False)

    def predict(self, X: object) -> np.ndarray:
        """The vote's label for each row of X."""
        queries = self._queries(X)
        return self.classes_[self.classifier_.predict(queries)]

    def predict_proba(self, X: object) -> np.ndarray:
        """Each class's share of the vote [n, n_classes], columns in `classes_` order."""
        queries = self._queries(X)
        return self.classifier_.predict_proba(queries)

    def kneighbors(self, X: object, n_neighbors: int | None = None,
                   return_distance: bool = True) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """(Euclidean distances, training row positions) of each row's nearest neighbours."""
        queries = self._queries(X)
        return self.classifier_.kneighbors(queries, n_neighbors or self.n_neighbors,
                                           return_distance)

    def __getstate__(self) -> dict:
        import faiss

        state = self.__dict__.copy()
        state.pop("classifier_", None)
        if "_fitted" in state:
            state["_fitted"] = {**state["_fitted"],
                                "index": faiss.serialize_index(state["_fitted"]["index"])}
        return state

    def __setstate__(self, state: dict) -> None:
        import faiss

        self.__dict__.update(state)
        if "_fitted" in state:
            self._fitted = {**state["_fitted"],
                            "index": faiss.deserialize_index(state["_fitted"]["index"])}
            self._assemble()
