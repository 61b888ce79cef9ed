"""The one image reader: every picture the package reads from a user (training photos, class images,
evaluation references, compare's saved samples) goes through `read_image` or `image_size`.

One rule, so training and evaluation see the same pixels: EXIF orientation applied; 16-bit and float
images scaled (not clipped) to 8 bits; transparency composited on white; and, before any pixel is
decoded, a file larger than `MAX_PIXELS` or narrower than 1:`MAX_ASPECT` (a 1 x 2,000,000 strip would be
upscaled to cover the training square) refused in one line. No torch import.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageFileError

MAX_PIXELS = 8192 * 8192  # 67 Mpx, below Pillow's own decompression-bomb warning (89 Mpx)
MAX_ASPECT = 16  # the long side at most 16 times the short one
# orientations 5-8 turn the picture by 90 degrees (ImageOps.exif_transpose swaps width and height)
_TRANSPOSED = {5, 6, 7, 8}
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError,
              Image.DecompressionBombWarning, EOFError)


class ImageBytes(io.BytesIO):
    """An image held in memory (a 🤗 datasets row's bytes), read like a file; named in messages by
    where it came from ("owner/name[train] row 12")."""

    def __init__(self, data: bytes, where: str):
        super().__init__(data)
        self.where = where

    def __str__(self) -> str:
        return self.where


def _source(path):
    return path if isinstance(path, ImageBytes) else Path(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


@contextlib.contextmanager
def _opened(path: Path):
    """The image with its header parsed and its size checked; nothing decoded yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UNREADABLE as err:
        raise ImageFileError(f"{path}: cannot read the image ({_first_line(err)}). Remove or replace it.") from None
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageFileError(f"{path}: {width}x{height} pixels is more than the {MAX_PIXELS:,} this package decodes; "
                                 "scale the image down (e.g. to 2048 px on its long side).")
        if width < 1 or height < 1 or max(width, height) > MAX_ASPECT * min(width, height):
            raise ImageFileError(f"{path}: {width}x{height} pixels is narrower than 1:{MAX_ASPECT}; crop it to a "
                                 "less extreme shape (it would be scaled up to cover the training square).")
        yield image


def image_size(path) -> tuple[int, int]:
    """(height, width) after EXIF rotation, from the file's header: no pixel is decoded. A PNG's chunks
    are checked (CRC) too. Raises `ImageFileError` (one line naming the file) on anything unreadable."""
    path = _source(path)
    with _opened(path) as image:
        try:
            width, height = image.size
            # the base class's getexif reads what the header gave (PNG's own would decode the image
            # to look for an eXIf chunk after the pixels)
            orientation = Image.Image.getexif(image).get(0x0112, 1)
            if image.format == "PNG":
                image.verify()  # chunk CRCs and the end of the file, without decompressing
        except UNREADABLE as err:
            raise ImageFileError(f"{path}: cannot read the image ({_first_line(err)}). Remove or replace it.") from None
    return (width, height) if orientation in _TRANSPOSED else (height, width)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit and float scaled down, transparency flattened on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def read_image(path) -> Image.Image:
    """The picture as the user sees it, as 8-bit RGB: EXIF-rotated, 16-bit scaled, alpha on white.
    Raises `ImageFileError` (one line naming the file) for anything unreadable, truncated or too large."""
    path = _source(path)
    with _opened(path) as image:
        try:
            image.load()  # decodes fully: truncated files raise here
            return to_rgb(ImageOps.exif_transpose(image))
        except UNREADABLE as err:
            raise ImageFileError(f"{path}: cannot decode the image ({_first_line(err)}). Remove or replace it.") from None
