"""Reading image files into RGB arrays, safely: size checked before decoding, every failure a DataError.

Orientation: the EXIF orientation tag is applied, so arrays (and `image_size`) are upright as a viewer or
browser shows them; boxes are in that upright pixel grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..errors import DataError

# Orientations 5-8 turn the image by 90 degrees: width and height swap.
_SWAPS_AXES = {5, 6, 7, 8}

# Exceptions PIL raises on unreadable, truncated or hostile files.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _open(path: str | os.PathLike[str]) -> Image.Image:
    """Open lazily (header only); raises DataError naming the file."""
    if not Path(path).is_file():
        raise DataError(f"{path}: image file not found")
    try:
        return Image.open(path)
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except _DECODE_ERRORS:
        return 1  # unreadable EXIF: show the pixels as stored, as browsers do


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """`(width, height)` of an image file after EXIF orientation, read from its header without decoding the
    pixels. Raises DataError naming the file if it is missing or not an image."""
    with _open(path) as image:
        width, height = image.size
        if _orientation(image) in _SWAPS_AXES:
            width, height = height, width
    return width, height


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode → (H, W, 3) uint8. 16-bit grayscale is scaled to 8 bits (value / 257); alpha is dropped
    (the colour channels are kept as stored, not composited)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)  # (H, W)
        gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
    if image.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no defined 8-bit range")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL wants palette transparency resolved through RGBA
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()  # (H, W, 3), writable


def read_image_rgb(path: str | os.PathLike[str], *, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode an image file into an upright (H, W, 3) uint8 RGB array.

    Grayscale, 16-bit, palette, RGBA, CMYK and other modes become RGB. Raises DataError naming the file when
    it is missing, cannot be decoded (including truncated files), or has more than `max_pixels` pixels; the
    pixel count is checked from the header, before decoding. PIL's own decompression-bomb limit applies too.
    """
    with _open(path) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise DataError(
                f"{path}: image of {width}x{height} = {width * height} pixels exceeds the limit of "
                f"{max_pixels} pixels"
            )
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_rgb_array(upright)
        except _DECODE_ERRORS as exc:
            raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
