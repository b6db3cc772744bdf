"""The certified search's bounds in integers, by the compiled kernels (mnist_ann/kernels.py).

The projected training rows y (float32, as stored) are quantized once, with one scale s for
every axis: x = round(y / s), |x| ≤ R, so that every dot product fits int32. A query's
projection is quantized the same way (clipped to ±R). By the triangle inequality, over any
first m axes,

    |y_q - y_x| ≥ s·|q - x| - |y_q - s·q| - |y_x - s·x|,

with |q - x|² an exact integer: the kernels compute it with 16-bit products and 32-bit sums
(AVX-512 VNNI's vpdpwssd adds two axes of 16 rows a query in one instruction). The errors are
known exactly, the query's per query and the rows' as their largest, so a row is certainly
farther than the k-th distance once |q - x|² exceeds an integer threshold (`thresholds`). That
one bound serves the lists' minima (on 32 axes), the first candidates (on all axes) and the
cascade that finds the rows to verify (16, 32, 64, ... axes, each stop on the rows left).

The kernels (mnist_ann/kernels.py) need the extension built; without it the certified search
runs on FAISS (certified.py's float32 steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mnist_ann.kernels import Kernels

CHUNK_AXES = 16  # the kernels' stops are whole chunks of 16 axes
MINIMA_AXES = 32  # list_maxima bounds the first 32 axes (MAXIMA_CHUNKS in _kernels.c)
MAX_WIDTH = 256  # nearest_in_lists keeps at most this many rows a query (_kernels.c)
ALIGNMENT = 64  # AVX-512 loads
# a padding row's -|x|²: below any real row's on 32 axes (where else found, dropped)
PADDING_NORM = 1 << 29
THRESHOLD_SLACK = 1e-9  # relative, on the float64 arithmetic of the thresholds
QUANTIZE_ROWS = 2048  # rows quantized at a time (float64 copies): bounded, and few pages to map

Map = Callable[..., Iterator]


def _aligned(values: np.ndarray) -> np.ndarray:
    """A copy of `values` whose data starts on an ALIGNMENT-byte boundary."""
    buffer = np.empty(values.nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    copy = buffer[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
    copy[...] = values
    return copy


def _address(values: np.ndarray) -> int:
    return values.ctypes.data


def largest_value(axes: int) -> int:
    """R: with |x|, |q| ≤ R on `axes` axes, acc = 2x·q - |x|² and every partial sum of it stay
    within int32 (|acc| ≤ 3·axes·R² < 2³¹), and 2q fits int16."""
    return int(min(2047, 0.9 * np.sqrt(2**31 / (3 * axes))))


@dataclass(frozen=True)
class QuantizedQueries:
    """Queries quantized as the rows: doubled int16 values, and per chunk c (the first 16·(c+1)
    axes) their squared norms and quantization errors."""

    doubled: np.ndarray  # [n, axes] int16, aligned
    squared_norms: np.ndarray  # [n, chunks] int64
    errors: np.ndarray  # [n, chunks] float64


class IntegerLayout:
    """Training rows quantized to int16 in blocks of 16 rows, list by list (the certified
    search's lists), for the kernels. Read-only once made: threads may share it."""

    def __init__(self, projected: np.ndarray, members: Sequence[np.ndarray],
                 kernels: Kernels) -> None:
        rows, dimension = projected.shape
        self.kernels = kernels
        self.axes = -(-dimension // CHUNK_AXES) * CHUNK_AXES  # zero axes change no distance
        self.chunks = self.axes // CHUNK_AXES
        self.groups = self.axes // 2
        self.chunk_ends = np.arange(CHUNK_AXES - 1, self.axes, CHUNK_AXES)  # last axis of each
        self.largest = largest_value(self.axes)
        largest = max(float(projected.max(initial=0)), -float(projected.min(initial=0)))
        self.scale = largest / self.largest or 1.0
        quantized = np.zeros((rows, self.axes), np.int16)
        # the rows' largest quantization error over the first 16·(c+1) axes, for each c
        self.row_errors = np.zeros(self.chunks)
        for start in range(0, rows, QUANTIZE_ROWS):  # float64 copies a part at a time
            part, errors = self._quantize(projected[start:start + QUANTIZE_ROWS])
            quantized[start:start + len(part)] = part
            self.row_errors = np.maximum(self.row_errors, errors.max(axis=0, initial=0))
        blocks = [-(-len(member) // 16) for member in members]
        self.list_starts = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int64)
        self.position_rows = np.full(int(self.list_starts[-1]) * 16, -1, np.int64)
        for member, start in zip(members, self.list_starts[:-1], strict=True):
            self.position_rows[start * 16:start * 16 + len(member)] = member
        present = self.position_rows >= 0
        values = np.zeros((len(self.position_rows), self.axes), np.int16)
        values[present] = quantized[self.position_rows[present]]
        blocks_total = len(values) // 16
        by_block = values.reshape(blocks_total, 16, self.groups, 2)
        self.rows = _aligned(by_block.transpose(0, 2, 1, 3))  # block, group, row, axis
        norms = np.empty((blocks_total, self.chunks, 16), np.int32)
        for chunk in range(self.chunks):
            axes = values[:, chunk * CHUNK_AXES:(chunk + 1) * CHUNK_AXES].astype(np.int32)
            norms[:, chunk, :] = -np.einsum("ij,ij->i", axes, axes).reshape(blocks_total, 16)
        norms[:, 0, :][~present.reshape(blocks_total, 16)] = -PADDING_NORM
        self.negative_norms = _aligned(norms)

    def _quantize(self, projected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectors [n, m ≤ axes] quantized [n, axes] (int16, clipped to ±R), and their errors
        over the first 16·(c+1) axes [n, chunks] (float64)."""
        wide = np.zeros((len(projected), self.axes), np.float64)
        wide[:, :projected.shape[1]] = projected
        quantized = np.clip(np.rint(wide / self.scale), -self.largest, self.largest)
        errors = np.sqrt(np.cumsum((wide - quantized * self.scale) ** 2,
                                   axis=1)[:, self.chunk_ends])
        return quantized.astype(np.int16), errors

    def __len__(self) -> int:
        return len(self.list_starts) - 1

    def quantize(self, projected: np.ndarray) -> QuantizedQueries:
        """Queries' projections [n, m ≤ axes] (float32), quantized as the rows."""
        n = len(projected)
        doubled = _aligned(np.zeros((n, self.axes), np.int16))
        norms = np.empty((n, self.chunks), np.int64)
        errors = np.empty((n, self.chunks))
        for start in range(0, n, QUANTIZE_ROWS):
            part, errors[start:start + QUANTIZE_ROWS] = self._quantize(
                projected[start:start + QUANTIZE_ROWS])
            doubled[start:start + len(part)] = 2 * part
            norms[start:start + len(part)] = np.cumsum(part.astype(np.int64)**2,
                                                         axis=1)[:, self.chunk_ends]
        return QuantizedQueries(doubled, norms, errors)

    def list_minima(self, queries: QuantizedQueries, run: Map, parts: int) -> np.ndarray:
        """Each list's smallest integer distance [lists, n] to each query on the first
        MINIMA_AXES axes (int32), the queries in `parts` slices on `run`."""
        n = len(queries.doubled)
        maxima = np.empty((len(self), n), np.int32)

        def part(j: int) -> None:
            self.kernels.list_maxima(
                _address(self.rows), _address(self.negative_norms), self.groups,
                _address(self.list_starts), len(self), _address(queries.doubled), self.axes, n,
                _address(maxima), j * n // parts, (j + 1) * n // parts)

        list(run(part, range(parts)))
        # |q|² - acc, in place: on 32 axes it stays under 32·(2R)² < 2³¹
        norms = queries.squared_norms[:, MINIMA_AXES // CHUNK_AXES - 1].astype(np.int32)
        return np.subtract(norms[None, :], maxima, out=maxima)

    def nearest(self, queries: QuantizedQueries, best: np.ndarray, width: int, axes: int,
                run: Map, parts: int) -> np.ndarray:
        """Training rows [n, width] (-1 past the end) nearest each query in integer distance on
        the first `axes` axes, among the rows of its lists `best` [n, F]."""
        n = len(queries.doubled)
        if not 1 <= width <= MAX_WIDTH or not 0 < axes <= self.axes or axes % CHUNK_AXES:
            raise ValueError(f"the kernel keeps 1 to {MAX_WIDTH} rows on whole chunks of "
                             f"{CHUNK_AXES} axes up to {self.axes}, not {width} on {axes}")
        best = np.ascontiguousarray(best, dtype=np.int32)
        if best.shape[0] != n or best.min() < 0 or best.max() >= len(self):
            raise ValueError(f"best lists {best.shape} for {n} queries over {len(self)} lists")
        positions = np.empty((n, width), np.int32)

        def part(j: int) -> None:
            self.kernels.nearest_in_lists(
                _address(self.rows), _address(self.negative_norms), self.groups,
                _address(self.list_starts), _address(queries.doubled), self.axes,
                axes // CHUNK_AXES, _address(best), best.shape[1], width, _address(positions),
                j * n // parts, (j + 1) * n // parts)

        list(run(part, range(parts)))
        return np.where(positions >= 0, self.position_rows[np.maximum(positions, 0)], -1)

    def thresholds(self, needed: np.ndarray, queries: QuantizedQueries,
                   stops: Sequence[int]) -> np.ndarray:
        """Per query and stop m [n, len(stops)]: the integer distance on the first m axes
        beyond which a row's projection is certainly farther than `needed` [n, len(stops)]
        (squared, exact projected distances)."""
        chunks = np.asarray(stops) // CHUNK_AXES - 1
        reach = (np.sqrt(needed) + queries.errors[:, chunks] + self.row_errors[chunks]) / self.scale
        return np.floor(reach**2 * (1 + THRESHOLD_SLACK)).astype(np.int64) + 1

    def limits(self, thresholds: np.ndarray, queries: QuantizedQueries,
               stops: Sequence[int]) -> np.ndarray:
        """The kernels' form of `thresholds`: a row stays while acc ≥ |q|² - threshold."""
        chunks = np.asarray(stops) // CHUNK_AXES - 1
        limits = queries.squared_norms[:, chunks] - thresholds
        return np.ascontiguousarray(np.clip(limits, -2**31 + 1, 2**31 - 1), dtype=np.int32)

    def within(self, j: int, queries: QuantizedQueries, asked: np.ndarray, limits: np.ndarray,
               stops: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(query, training row) pairs of list j whose integer distance stays within the
        limits at every stop, for the queries `asked`, grouped by query."""
        asked = np.ascontiguousarray(asked, dtype=np.int32)
        start, stop = int(self.list_starts[j]), int(self.list_starts[j + 1])
        capacity = len(asked) * (stop - start) * 16
        found_queries = np.empty(capacity, np.int32)
        found_positions = np.empty(capacity, np.int32)
        chunk_stops = np.asarray(stops, np.int32) // CHUNK_AXES
        count = self.kernels.cascade(
            _address(self.rows), _address(self.negative_norms), self.groups, start, stop,
            _address(queries.doubled), self.axes, _address(asked), len(asked), _address(limits),
            _address(chunk_stops), len(chunk_stops), _address(found_queries),
            _address(found_positions), capacity)
        rows = self.position_rows[found_positions[:count]]
        present = rows >= 0  # padding rows pass a limit clipped to int32's least
        return found_queries[:count][present].astype(np.int64), rows[present]
