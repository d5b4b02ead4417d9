"""Small files written by the dataset importer tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 20)) -> Path:
    """A black `size` (width, height) image of PIL `mode` at `path`, its folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path
