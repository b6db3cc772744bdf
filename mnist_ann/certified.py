"""Lower bounds of pixel distances from a PCA projection, with a margin for float32 rounding.

A centred orthonormal projection A never lengthens a difference: |A(q - x)|² ≤ s·|q - x|², where
s is the largest squared singular value of the float32 matrix actually used (1 up to rounding).
Distances between projected vectors are therefore lower bounds of the true ones, once three
float32 errors are allowed for:

1. FAISS's flat search computes |a|² + |b|² - 2a·b in float32: off by at most `float_margin`
   · (|a|² + |b|²), the margin the flat index's own certification uses;
2. each projected coordinate A_i·x + b_i is a float32 dot product of 785 terms: off by at most
   g·|A_i|·(|x| + 2|μ|) with g = 785·2⁻²⁴ (b = -Aμ is itself rounded), so the difference of
   two projections is off by at most ε = √m · g · max|A_i| · (|q| + |x| + 4|μ|) in length;
3. s above, computed in float64 from the stored float32 matrix.

Everything is doubled for safety. The bound is monotone in the computed distance, so the
smallest computed distance among unverified rows bounds every one of them, and its inverse
(`radius`) is the computed distance below which a row may still be a neighbour.
"""

from __future__ import annotations

import faiss
import numpy as np

from mnist_ann.recipes import flat_vectors

PROJECTION_ERROR = 2 * 785 * 2.0**-24  # g per unit length, doubled


class LowerBounds:
    """The projected training set of a `PCA<D>,Flat` index, searchable on its first m axes."""

    def __init__(self, index: faiss.IndexPreTransform, max_pixel_norm: float,
                 float_margin: float) -> None:
        if index.chain.size() != 1:
            raise ValueError("a certified index is PCA<D>,Flat: one transform, then Flat")
        self.pca = faiss.downcast_VectorTransform(index.chain.at(0))
        flat = faiss.downcast_index(index.index)
        if not isinstance(self.pca, faiss.PCAMatrix) or not isinstance(flat, faiss.IndexFlat):
            raise ValueError("a certified index is PCA<D>,Flat")
        self.dimension = int(self.pca.d_out)
        self.projected = flat_vectors(flat)
        self.matrix = faiss.vector_to_array(self.pca.A).reshape(
            self.pca.d_out, self.pca.d_in).astype(np.float64)
        self.mean_norm = float(np.linalg.norm(faiss.vector_to_array(self.pca.mean)))
        self.max_pixel_norm = max_pixel_norm
        self.float_margin = float_margin
        self._levels: dict[int, tuple[faiss.IndexFlatL2, float, float, float]] = {}

    def project(self, pixels: np.ndarray, components: int) -> np.ndarray:
        """float32 projections [n, components] of uint8 queries, as the index projected rows."""
        projected = self.pca.apply(np.ascontiguousarray(pixels, dtype=np.float32))
        return np.ascontiguousarray(projected[:, :components])

    def index(self, components: int) -> faiss.IndexFlatL2:
        return self._level(components)[0]

    def _level(self, components: int) -> tuple[faiss.IndexFlatL2, float, float, float]:
        """The flat index over the first m axes, max squared norm, scale s and row norm."""
        if components not in self._levels:
            vectors = np.ascontiguousarray(self.projected[:, :components])
            index = faiss.IndexFlatL2(components)
            index.add(vectors)
            wide = vectors.astype(np.float64)
            matrix = self.matrix[:components]
            self._levels[components] = (
                index, float(np.einsum("ij,ij->i", wide, wide).max()),
                float(np.linalg.norm(matrix, 2) ** 2),
                float(np.linalg.norm(matrix, axis=1).max()))
        return self._levels[components]

    def lower_bound(self, computed: np.ndarray, query_squared_norms: np.ndarray,
                    projected: np.ndarray, components: int) -> np.ndarray:
        """Certain lower bounds of the true squared pixel distances, from the float32
        distances FAISS computed between projections (one per query)."""
        flat_error, epsilon, scale = self._errors(query_squared_norms, projected, components)
        root = np.sqrt(np.maximum(computed.astype(np.float64) - flat_error, 0)) - epsilon
        return np.maximum(root, 0) ** 2 / scale

    def radius(self, kth_distances: np.ndarray, query_squared_norms: np.ndarray,
               projected: np.ndarray, components: int) -> np.ndarray:
        """Per query, a computed distance above which `lower_bound` exceeds the k-th distance:
        rows computed at or beyond it cannot be neighbours (the inverse of lower_bound)."""
        flat_error, epsilon, scale = self._errors(query_squared_norms, projected, components)
        root = np.sqrt(kth_distances.astype(np.float64) * scale) + epsilon
        return (root**2 + flat_error) * (1 + 1e-6) + 1e-3

    def _errors(self, query_squared_norms: np.ndarray, projected: np.ndarray,
                components: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Per query: the flat search's error, the projection error (a length), and the
        matrix scale s (its excess over 1 doubled)."""
        _, max_projected, scale, row_norm = self._level(components)
        wide = projected.astype(np.float64)
        flat_error = 2 * self.float_margin * (np.einsum("ij,ij->i", wide, wide) + max_projected)
        epsilon = (PROJECTION_ERROR * np.sqrt(components) * row_norm
                   * (np.sqrt(query_squared_norms) + self.max_pixel_norm + 4 * self.mean_norm))
        return flat_error, epsilon, (2 * scale - 1 if scale > 1 else 1.0)
