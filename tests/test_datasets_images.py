"""Image reading: every mode to RGB, EXIF orientation, and every failure a DataError naming the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magral_core.datasets.images import image_size, read_image_rgb
from magral_core.errors import DataError


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but carries no pixel data: opening reads the size only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def test_grayscale_png_becomes_rgb(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    rgb = read_image_rgb(tmp_path / "g.png")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], gray)
    assert image_size(tmp_path / "g.png") == (4, 3)


def test_rgba_drops_alpha_keeping_colours(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = read_image_rgb(tmp_path / "a.png")
    assert rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb[0, 0], [10, 20, 30])


def test_palette_with_transparency_and_sixteen_bit(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    rgb = read_image_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(rgb[0, 1], [200, 100, 50])

    deep = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")  # mode I;16
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "d.png")[0, :, 0], [0, 100, 255])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 32 wide x 16 high, left half red, right half blue; orientation 6 = show rotated 90 deg
    # clockwise, so the viewer sees 16 wide x 32 high with red on top.
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16, 0] = 255
    stored[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif, quality=95)
    rgb = read_image_rgb(tmp_path / "o.jpg")
    assert rgb.shape == (32, 16, 3)
    assert rgb[4, 8, 0] > 200 and rgb[4, 8, 2] < 50
    assert rgb[28, 8, 2] > 200 and rgb[28, 8, 0] < 50
    assert image_size(tmp_path / "o.jpg") == (16, 32)


def test_missing_undecodable_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.png: image file not found"):
        read_image_rgb(tmp_path / "nope.png")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"junk.jpg"):
        read_image_rgb(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match=r"junk.jpg"):
        image_size(tmp_path / "junk.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / "cut.jpg") == (64, 64)  # the header is intact
    with pytest.raises(DataError, match=r"cut.jpg: cannot decode"):
        read_image_rgb(tmp_path / "cut.jpg")


def test_pixel_limit_checked_from_the_header(tmp_path: Path) -> None:
    # 10000 x 6000 = 60 M pixels, no pixel data: only a header check can answer (decoding would fail).
    big = _png_header_only(tmp_path / "big.png", 10_000, 6_000)
    assert image_size(big) == (10_000, 6_000)
    with pytest.raises(DataError, match=r"big.png: image of 10000x6000 = 60000000 pixels exceeds"):
        read_image_rgb(big)
    with pytest.raises(DataError, match=r"exceeds the limit of 100 pixels"):
        read_image_rgb(_png_header_only(tmp_path / "small.png", 20, 10), max_pixels=100)


def test_pil_decompression_bomb_becomes_data_error(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # beyond PIL's own limit
    with pytest.raises(DataError, match=r"bomb.png.*DecompressionBombError"):
        read_image_rgb(bomb, max_pixels=10**12)
