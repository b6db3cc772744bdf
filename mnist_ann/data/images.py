"""Opening image files that come from elsewhere: the format checked, and the size checked on
the header, before anything is decoded.

Pillow's own guard (a warning from 89 megapixels, an error from twice that) is process-wide
state; mnist-ann leaves it as it is and refuses, itself, any image over MAX_IMAGE_PIXELS before
decoding it: a 68-byte PNG claiming 400 megapixels costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnist_ann.errors import DataError


class UnreadableImage(DataError):
    """The bytes are not an image of the expected formats, or its data is damaged."""

# a photo of a digit needs no more: 40 megapixels is a 12,000 x 3,300 image, 160 MB as RGBA
MAX_IMAGE_PIXELS = 40_000_000


@contextmanager
def open_image(source: Path | object, formats: tuple[str, ...], what: str,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[object]:
    """A Pillow image of one of `formats`, whose header was read but whose pixels were not;
    refused with a DataError when it is another format, damaged, or larger than `max_pixels`
    (checked on the header, before decoding)."""
    from PIL import Image

    try:
        image = Image.open(source, formats=list(formats))
    except Image.DecompressionBombError as exc:
        raise DataError(f"{what}: the image claims more pixels than mnist-ann decodes "
                        f"({max_pixels:,} at most)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(f"{what}: not a readable {' or '.join(formats)} image "
                              f"({exc})") from exc
    with image:
        width, height = image.size
        if width * height > max_pixels or width < 1 or height < 1:
            raise DataError(f"{what}: {width}x{height} pixels is more than mnist-ann decodes "
                            f"({max_pixels:,} at most)")
        yield image


def load_pixels(image: object, what: str) -> object:
    """Decode an opened image's pixels; a truncated or damaged file is a DataError."""
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(f"{what}: the image data is damaged or truncated ({exc})") \
            from exc
    return image


def png_bytes(pixels) -> bytes:
    """A 28x28 uint8 digit (or [784]) as PNG bytes, white on black as MNIST stores it."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(pixels.reshape(28, 28)).save(buffer, format="PNG")
    return buffer.getvalue()
