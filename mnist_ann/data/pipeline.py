"""Preprocessing steps applied to training images at build time and to every query.

A pipeline is a tuple of step names. Steps map uint8 pixels [n, 784] to float32 features; the
FAISS factory string may then transform them further (L2norm, PCA), inside the index file.
"""

from __future__ import annotations

import numpy as np

from mnist_ann.data.mnist import N_PIXELS
from mnist_ann.errors import InvalidArgument

SIDE = 28
CENTRE = SIDE / 2.0
_AXIS = np.arange(SIDE, dtype=np.float64)
_ROWS, _COLUMNS = (grid.ravel() for grid in np.mgrid[:SIDE, :SIDE].astype(np.float64))
_MOMENT_WEIGHTS = np.stack([np.ones(N_PIXELS), _ROWS, _COLUMNS, _ROWS**2, _ROWS * _COLUMNS], 1)
_PAD = SIDE + 1
_ROW_WIDTH = SIDE + 2 * _PAD
_ROW_WINDOW = np.arange(SIDE + 1)
_IMAGE_WIDTH = _ROW_WIDTH * SIDE
_IMAGE_WINDOW = np.arange((SIDE + 1) * SIDE)
# small blocks keep every temporary in cache: 128 images deskew faster per image than 4096
BLOCK = 128


def _moments(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre of mass (row, column) and the shear cov(row, column) / var(row) of each image."""
    sums = pixels.astype(np.float64) @ _MOMENT_WEIGHTS  # Σx, Σrx, Σcx, Σr²x, Σrcx
    total = np.where(sums[:, 0] > 0, sums[:, 0], 1)
    mean_row, mean_col = sums[:, 1] / total, sums[:, 2] / total
    var_row = sums[:, 3] / total - mean_row**2
    cov = sums[:, 4] / total - mean_row * mean_col
    shear = np.divide(cov, var_row, out=np.zeros_like(cov), where=var_row > 1e-9)
    return mean_row, mean_col, shear


def _shift_images(images: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Sample images [n, 784] at rows r + shift[n], linearly, zero outside."""
    n = len(images)
    padded = np.zeros((n, _IMAGE_WIDTH), np.float32)
    padded[:, _PAD * SIDE:(_PAD + SIDE) * SIDE] = images
    whole = np.floor(shift)
    fraction = (shift - whole).astype(np.float32)[:, None]
    start = (np.clip(whole, -_PAD, SIDE).astype(np.intp) + _PAD) * SIDE
    window = padded.reshape(-1).take((start + _IMAGE_WIDTH * np.arange(n))[:, None]
                                     + _IMAGE_WINDOW)
    top = window[:, :N_PIXELS]
    return top + fraction * (window[:, SIDE:] - top)


def _shift_rows(rows: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Sample each row of rows [n, 28] at columns c + shift[n], linearly, zero outside."""
    n = len(rows)
    padded = np.zeros((n, _ROW_WIDTH), np.float32)
    padded[:, _PAD:_PAD + SIDE] = rows
    whole = np.floor(shift)
    fraction = (shift - whole).astype(np.float32)[:, None]
    start = np.clip(whole, -_PAD, SIDE).astype(np.intp) + _PAD
    window = padded.reshape(-1).take((start + _ROW_WIDTH * np.arange(n))[:, None] + _ROW_WINDOW)
    left = window[:, :SIDE]
    return left + fraction * (window[:, 1:] - left)


def _deskew_block(pixels: np.ndarray) -> np.ndarray:
    n = len(pixels)
    mean_row, mean_col, shear = _moments(pixels)
    # output (r, c) samples input (r + mean_row - CENTRE, c + shear·(r - CENTRE) + mean_col -
    # CENTRE): the centre of mass moves to the centre and the shear is undone. Beyond
    # ±(SIDE + 1) pixels a window holds only padding, as the true samples are zero.
    upright = _shift_images(pixels.astype(np.float32), mean_row - CENTRE)
    horizontal = shear[:, None] * (_AXIS - CENTRE) + (mean_col - CENTRE)[:, None]
    return _shift_rows(upright.reshape(n * SIDE, SIDE), horizontal.reshape(-1)).reshape(
        n, N_PIXELS)


def deskew(pixels: np.ndarray) -> np.ndarray:
    """Undo each digit's shear and centre its mass, by its image moments (float32 [n, 784]).

    The affine map is the classic moment deskew (shear cov/var of the row coordinate, centre
    of mass to the image centre) with bilinear sampling, vectorized over the whole batch.
    """
    out = np.empty(pixels.shape, np.float32)
    for start in range(0, len(pixels), BLOCK):
        out[start:start + BLOCK] = _deskew_block(pixels[start:start + BLOCK])
    return out


STEPS = {"deskew": deskew}


def check_pipeline(steps: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        raise InvalidArgument(f"unknown pipeline step {unknown[0]!r}; known steps: "
                              f"{', '.join(STEPS)}")
    return tuple(steps)


def apply_pipeline(steps: tuple[str, ...], pixels: np.ndarray) -> np.ndarray:
    """float32 features of uint8 pixels [n, 784] after every step in turn."""
    features = pixels
    for step in steps:
        features = STEPS[step](features)
    return np.ascontiguousarray(features, dtype=np.float32)
