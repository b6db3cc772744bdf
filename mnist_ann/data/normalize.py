"""Real images made MNIST-style: a photo, a canvas drawing or any picture of one digit becomes
a 28x28 white-on-black digit made the way MNIST's own were made.

MNIST's recipe (LeCun's page, confirmed on the 70,000): the digit's bounding box is scaled,
antialiased, keeping its aspect ratio, to a long side of 20 px, then placed in the 28x28 field
by the integer shift that brings its centre of mass nearest (row 14, col 14). Grey levels are
not stretched. Before that, a photo is cleaned: a light background is inverted, uneven lighting
removed (a grey opening wider than any stroke estimates the background), Otsu's threshold
separates ink from paper, and connected components much smaller than the digit's main stroke
(specks) are dropped while every stroke of the digit is kept.

scipy.ndimage (installed with scikit-learn) does the opening and the connected components: both
are a line each there and a page of slow numpy here.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist_ann.data.images import load_pixels, open_image
from mnist_ann.errors import DataError, InvalidArgument

MODES = ("auto", "photo", "canvas", "mnist", "none")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
FORMAT_OF_SUFFIX = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
IMAGE_SUFFIXES = tuple(FORMAT_OF_SUFFIX)
FIELD, BOX = 28, 20
# photos are shrunk to this long side before cleaning: the digit ends 20 px tall anyway
WORK_SIDE = 512
# a component smaller than this share of the largest is a speck (a stroke of a two-stroke
# 4, 5 or 7 is a third of the main one or more)
SPECK_SHARE = 0.05
# ink and paper must differ by this many grey levels, or there is no digit to find
MIN_CONTRAST = 24.0


@dataclass(frozen=True)
class Normalized:
    """A 28x28 uint8 white-on-black digit, and what was done to make it."""

    pixels: np.ndarray
    record: dict = field(default_factory=dict)


def normalize(source: Path | bytes | np.ndarray, mode: str = "auto", what: str = "image",
              formats: tuple[str, ...] = IMAGE_FORMATS) -> Normalized:
    """An image file (path or bytes) or a grey array made MNIST-style.

    `mode`: `photo` (paper under any light: inverted if light, lighting removed, Otsu,
    specks dropped), `canvas` (a drawing: composited over white, inverted if light, faint
    pixels dropped), `mnist` (already white on black: only box and centring), `none` (must
    already be 28x28), `auto` (28x28 grey white-on-black passes unchanged; a drawing with
    transparency is a canvas; anything else a photo). A file must hold the format its
    suffix names; bytes one of `formats`.
    """
    grey, alpha = (as_grey_array(source, what) if isinstance(source, np.ndarray)
                   else read_grey(source, what, formats))
    return normalize_grey(grey, alpha, mode, what)


def normalize_grey(grey: np.ndarray, alpha: np.ndarray | None, mode: str = "auto",
                   what: str = "image") -> Normalized:
    """`normalize` of pixels already read: float grey 0..255 and the alpha, if any."""
    if mode not in MODES:
        raise InvalidArgument(f"normalisation {mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        mode = auto_mode(grey, alpha)
    record: dict = {"mode": mode, "size": [int(grey.shape[1]), int(grey.shape[0])]}
    if mode == "none":
        if grey.shape != (FIELD, FIELD):
            raise DataError(f"{what}: {grey.shape[1]}x{grey.shape[0]} pixels; without "
                            "normalisation an image must be 28x28 (use --normalize auto)")
        pixels = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        if not pixels.any():
            raise DataError(f"{what}: no digit found (the image is all black)")
        return Normalized(pixels, record)
    if mode == "mnist":
        ink = grey
        record["inverted"] = False
    else:
        ink, record["inverted"] = white_on_black(grey)
    if mode == "photo":
        ink, scale = shrink(ink, WORK_SIDE)
        record["work_scale"] = round(scale, 4)
        ink = remove_lighting(ink)
    mask = ink_mask(ink, mode, record, what)
    ink = np.where(mask, ink, 0.0)
    if mode == "photo":  # paper photographs are grey on grey: stretch the strokes' core to 255
        core = float(np.percentile(ink[mask], 90))
        ink = np.clip(ink * (255.0 / max(core, 1.0)), 0, 255)
    return Normalized(place(ink, mask, record), record)


# --- reading -------------------------------------------------------------------------------

def read_grey(source: Path | bytes, what: str, formats: tuple[str, ...] = IMAGE_FORMATS
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """A file's pixels as float grey 0..255 (alpha composited over white) and its alpha."""
    from PIL import ImageOps

    if isinstance(source, bytes):
        stream = io.BytesIO(source)
    else:
        stream = source
        if source.suffix.lower() not in FORMAT_OF_SUFFIX:
            raise DataError(f"{what}: not a .png, .jpg or .webp file")
        formats = (FORMAT_OF_SUFFIX[source.suffix.lower()],)
    with open_image(stream, formats, what) as image:
        load_pixels(image, what)
        image = ImageOps.exif_transpose(image)
        return image_to_grey(image)


def image_to_grey(image) -> tuple[np.ndarray, np.ndarray | None]:
    from PIL import Image

    alpha = None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P"
                                              and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return (values * (255.0 / top)).astype(np.float32), alpha
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0, 255), alpha
    return np.asarray(image.convert("L"), dtype=np.float32), alpha


def as_grey_array(array: np.ndarray, what: str) -> tuple[np.ndarray, None]:
    array = np.asarray(array)
    if array.ndim == 1 and array.size == FIELD * FIELD:
        array = array.reshape(FIELD, FIELD)
    if array.ndim != 2 or min(array.shape) < 1 or array.dtype.kind not in "biuf":
        raise DataError(f"{what}: expected a 2-D grey image of numbers, got shape "
                        f"{list(array.shape)} of {array.dtype}")
    grey = array.astype(np.float32)
    if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 255:
        raise DataError(f"{what}: grey levels must be 0..255")
    return grey, None


def auto_mode(grey: np.ndarray, alpha: np.ndarray | None) -> str:
    if grey.shape == (FIELD, FIELD) and alpha is None and border(grey).mean() < 64:
        return "none"
    return "canvas" if alpha is not None and alpha.min() < 255 else "photo"


# --- cleaning ------------------------------------------------------------------------------

def border(grey: np.ndarray) -> np.ndarray:
    return np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])


def white_on_black(grey: np.ndarray) -> tuple[np.ndarray, bool]:
    """Ink bright on a dark background: a light border (paper, a white canvas) is inverted."""
    if float(np.median(border(grey))) > 127:
        return 255.0 - grey, True
    return grey, False


def shrink(grey: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    from PIL import Image

    scale = min(1.0, side / max(grey.shape))
    if scale == 1.0:
        return grey, 1.0
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    return np.asarray(Image.fromarray(grey, "F").resize(size, Image.Resampling.LANCZOS)), scale


def remove_lighting(ink: np.ndarray) -> np.ndarray:
    """Ink minus the background: a grey opening wider than any stroke keeps only the slowly
    varying light (a shadow, a lamp's gradient) and not the digit."""
    from scipy import ndimage

    width = max(3, max(ink.shape) // 8) | 1
    background = ndimage.grey_opening(ink, size=(width, width))
    return np.clip(ink - ndimage.uniform_filter(background, size=width), 0, 255)


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of grey levels 0..255: the split with the largest between-class
    variance."""
    histogram = np.bincount(np.clip(values, 0, 255).astype(np.uint8).ravel(), minlength=256)
    share = histogram / histogram.sum()
    levels = np.arange(256)
    weight = np.cumsum(share)
    mean = np.cumsum(share * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean[-1] * weight - mean) ** 2 / (weight * (1 - weight))
    return float(np.nanargmax(between)) + 0.5


def ink_mask(ink: np.ndarray, mode: str, record: dict, what: str) -> np.ndarray:
    """Which pixels are the digit: all non-zero ones for `mnist`; otherwise above a threshold,
    in connected components that are not specks. No digit is a DataError."""
    from scipy import ndimage

    if mode == "mnist":
        mask = ink > 0
    elif float(ink.max() - ink.min()) < MIN_CONTRAST:
        mask = np.zeros(ink.shape, bool)
    else:
        threshold = otsu(ink) if mode == "photo" else 24.0
        record["threshold"] = round(threshold, 1)
        mask = ink > threshold
        if mask.any() and float(ink[mask].mean() - ink[~mask].mean()
                                if (~mask).any() else ink[mask].mean()) < MIN_CONTRAST:
            mask[:] = False
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            keep = np.flatnonzero(sizes >= SPECK_SHARE * sizes.max()) + 1
            mask = np.isin(labels, keep)
            record["components"] = {"found": int(count), "kept": len(keep)}
    if mask.sum() < 4:
        raise DataError(f"{what}: no digit found (the image is blank, or ink and background "
                        "are too alike); photograph one dark digit on light paper, or draw "
                        "one")
    return mask


# --- MNIST's box and centring --------------------------------------------------------------

def place(ink: np.ndarray, mask: np.ndarray, record: dict) -> np.ndarray:
    """The digit's box scaled to a long side of 20 px (LANCZOS to shrink, BICUBIC to enlarge),
    placed in 28x28 by the integer shift that centres its mass."""
    from PIL import Image

    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = ink[top:bottom, left:right]
    record["box"] = [int(left), int(top), int(right), int(bottom)]
    height, width = box.shape
    if max(height, width) != BOX:
        scale = BOX / max(height, width)
        size = (max(1, min(BOX, round(width * scale))), max(1, min(BOX, round(height * scale))))
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        box = np.asarray(Image.fromarray(box.astype(np.float32), "F").resize(size, method))
        record["scale"] = round(scale, 4)
    box = np.clip(np.rint(box), 0, 255).astype(np.uint8)
    height, width = box.shape
    mass = box.astype(np.float64)
    total = mass.sum()
    if total == 0:
        raise DataError("no digit left after scaling; the strokes are too faint")
    centre_row = (mass.sum(1) * np.arange(height)).sum() / total
    centre_col = (mass.sum(0) * np.arange(width)).sum() / total
    row = min(max(math.floor(FIELD / 2 + 0.5 - centre_row), 0), FIELD - height)
    col = min(max(math.floor(FIELD / 2 + 0.5 - centre_col), 0), FIELD - width)
    record["shift"] = [int(col), int(row)]
    out = np.zeros((FIELD, FIELD), np.uint8)
    out[row:row + height, col:col + width] = box
    return out


def image_files(paths: list[Path]) -> list[Path]:
    """Image files named, or found in the folders named (sorted), by suffix."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir()
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found:
        raise DataError(f"{', '.join(map(str, paths))}: no .png, .jpg or .webp images")
    return found
