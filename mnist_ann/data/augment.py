"""Deformed copies of training digits, infinite-MNIST style (Loosli, Canu & Bottou 2007).

Each copy moves every pixel along a smooth random displacement field, applied to first
order through the image gradient (I(p - u) ≈ I(p) - u·∇I(p)), then shifts the digit by at
most one pixel. Copy c of a table is drawn from its own seeded generator (seed, c), so the
same seed gives the same pixels, whatever else was made.

Augmented rows carry id `copy * MNIST_ROWS + id` (copy ≥ 1), so that `source_ids` maps every
training row back to the MNIST digit it was made from (the held-out tuning drops all of a
query's copies, not only its own row).
"""

from __future__ import annotations

import numpy as np

from mnist_ann.errors import InvalidArgument

SIDE = 28
MNIST_ROWS = 70_000
GRID = 4  # the displacement field: random at 4x4 points, interpolated bilinearly
DISPLACEMENT = 1.2  # pixels, standard deviation at each grid point
MAX_COPIES = 100
CHUNK = 8192


def _field_basis() -> np.ndarray:
    """[GRID², 784]: each grid point's bilinear weight at every pixel, so that a field's
    values at the grid points [n, GRID²] become a smooth field [n, 784] in one product."""
    positions = np.linspace(0, GRID - 1, SIDE)
    low = np.minimum(np.floor(positions).astype(int), GRID - 2)
    weights = np.zeros((SIDE, GRID), np.float32)
    weights[np.arange(SIDE), low] = 1 - (positions - low)
    weights[np.arange(SIDE), low + 1] = positions - low
    return np.einsum("yi,xj->ijyx", weights, weights).reshape(GRID * GRID, SIDE * SIDE)


_BASIS = _field_basis()


def deform(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One deformed copy of each image [n, 784] uint8, drawn from `rng`."""
    n = len(images)
    pixels = images.reshape(n, SIDE, SIDE).astype(np.float32)
    gx, gy = np.zeros_like(pixels), np.zeros_like(pixels)  # central differences
    np.subtract(pixels[:, :, 2:], pixels[:, :, :-2], out=gx[:, :, 1:-1])
    np.subtract(pixels[:, 2:], pixels[:, :-2], out=gy[:, 1:-1])
    field = rng.normal(0, DISPLACEMENT / 2, (n * 2, GRID * GRID)).astype(np.float32)
    shifts = rng.integers(-1, 2, (n, 2))
    smooth = (field @ _BASIS).reshape(n, 2, SIDE, SIDE)  # halved: the differences span 2 px
    moved = pixels - smooth[:, 0] * gx - smooth[:, 1] * gy
    moved = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
    padded = np.pad(moved, ((0, 0), (1, 1), (1, 1)))
    out = np.empty_like(moved)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            chosen = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[chosen] = padded[chosen, 1 - dy:1 - dy + SIDE, 1 - dx:1 - dx + SIDE]
    return out.reshape(n, SIDE * SIDE)


def check_copies(copies: int) -> int:
    if not isinstance(copies, int) or not 0 <= copies <= MAX_COPIES:
        raise InvalidArgument(f"--augment takes 0 to {MAX_COPIES} deformed copies, not "
                              f"{copies!r}")
    return copies


def augmented_copies(ids: np.ndarray, labels: np.ndarray, pixels: np.ndarray, copies: int,
                     seed: int, progress=None):
    """Yield (ids, labels, pixels) of each deformed copy in turn (copy 1 first)."""
    check_copies(copies)
    if len(ids) and ids.max() >= MNIST_ROWS:
        raise InvalidArgument("only MNIST's own rows are augmented, not copies of copies")
    for copy in range(1, copies + 1):
        rng = np.random.default_rng([seed, copy])
        parts = [deform(pixels[start:start + CHUNK], rng)
                 for start in range(0, len(pixels), CHUNK)]
        if progress is not None:
            progress(copy)
        yield ids + copy * MNIST_ROWS, labels, np.concatenate(parts) if parts else pixels[:0]


def source_ids(ids: np.ndarray) -> np.ndarray:
    """The MNIST id each row was made from (its own for MNIST rows)."""
    return np.asarray(ids) % MNIST_ROWS
