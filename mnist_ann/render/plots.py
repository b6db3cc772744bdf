"""Pictures: digit grids and confusion-matrix heatmaps, written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mnist_ann.fileio import atomic_path


def save_figure(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def digit_grid(pixels: np.ndarray, titles: list[str], path: Path, columns: int = 10) -> None:
    """Save images [n, 784] as a grid of 28x28 digits, each with its title."""
    count = len(pixels)
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.4 * rows),
                                squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position < count:
            axis.imshow(pixels[position].reshape(28, 28), cmap="gray_r", vmin=0, vmax=255)
            axis.set_title(titles[position], fontsize=9)
    save_figure(figure, path)


def confusion_heatmap(matrix: np.ndarray, path: Path, title: str) -> None:
    """Save a confusion matrix (true labels down, predicted across) as an annotated heatmap."""
    figure, axis = plt.subplots(figsize=(7, 6))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis)
    size = matrix.shape[0]
    axis.set_xticks(range(size))
    axis.set_yticks(range(size))
    axis.set_xlabel("predicted label")
    axis.set_ylabel("true label")
    axis.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(size):
        for column in range(size):
            value = int(matrix[row, column])
            axis.text(column, row, str(value), ha="center", va="center", fontsize=7,
                      color="white" if value > threshold else "black")
    save_figure(figure, path)


def before_after_grid(originals: list[np.ndarray], normalized: np.ndarray, titles: list[str],
                      path: Path) -> None:
    """Save each image as it came (grey) beside its MNIST-style 28x28, one pair a row."""
    count = len(originals)
    figure, axes = plt.subplots(count, 2, figsize=(3.6, 1.7 * count), squeeze=False)
    for row, (original, pixels, title) in enumerate(zip(originals, normalized, titles,
                                                        strict=True)):
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].imshow(original, cmap="gray", vmin=0, vmax=255)
        axes[row][0].set_title(title, fontsize=8)
        axes[row][1].imshow(pixels.reshape(28, 28), cmap="gray", vmin=0, vmax=255)
        axes[row][1].set_title("28x28", fontsize=8)
    save_figure(figure, path)
