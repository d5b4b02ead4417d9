"""Pascal VOC XML importer (`load_voc`), cleaned and counted like every importer (see
`magral_core.datasets`); splits come from `ImageSets/Main` listings.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from ..structures import DetectionDataset
from .common import build_dataset, clean_image
from .images import image_size

VOC_SPLITS = ("train", "val", "test")
"""ImageSets/Main files read as splits; `trainval.txt` only names images listed in none of them."""


def _voc_text(file: Path, node: ET.Element, tag: str) -> str:
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise DataError(f"{file}: missing <{tag}>")
    return text.strip()


def _voc_number(file: Path, node: ET.Element, tag: str) -> float:
    text = _voc_text(file, node, tag)
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{file}: <{tag}> expected a number, found {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{file}: <{tag}> expected a finite number, found {text!r}")
    return value


def _read_voc_xml(file: Path) -> tuple[str, int | None, int | None, list[tuple[str, list[float], bool]]]:
    """(image file name, width or None, height or None, [(class name, xyxy, difficult)])."""
    try:
        root = ET.parse(file).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{file}: invalid XML ({exc})") from None
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc})") from None
    file_name = (root.findtext("filename") or "").strip() or f"{file.stem}.jpg"
    size = root.find("size")
    width = height = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        width, height = int(_voc_number(file, size, "width")), int(_voc_number(file, size, "height"))
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{file}: <object> without <bndbox>")
        xyxy = [_voc_number(file, box, tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true")
        objects.append((_voc_text(file, obj, "name"), xyxy, difficult))
    return file_name, width, height, objects


def _voc_splits(imagesets_dir: Path) -> dict[str, str]:
    """Image stem → split, from ImageSets/Main/{train,val,test}.txt, then trainval.txt for the rest."""
    if not imagesets_dir.is_dir():
        raise DataError(f"{imagesets_dir}: ImageSets directory not found")
    split_of: dict[str, str] = {}
    for split in (*VOC_SPLITS, "trainval"):
        listing = imagesets_dir / f"{split}.txt"
        if not listing.is_file():
            continue
        for line in listing.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            stem = line.split()[0]
            first = split_of.setdefault(stem, split)
            if first != split and split != "trainval":
                raise DataError(f"{listing}: {stem} is also listed in {first}.txt")
    return split_of


def load_voc(
    annotation_dir: str | Path,
    *,
    image_dir: str | Path,
    class_names: Sequence[str] | None = None,
    imagesets_dir: str | Path | None = None,
) -> DetectionDataset:
    """Import Pascal VOC XML files (`annotation_dir/*.xml`, in file-name order; image ids 1..N).

    Coordinates: the VOC `xmin, ymin, xmax, ymax` numbers are taken as xyxy corners unchanged, the
    convention of torchvision's VOC reference and of BCCD's own COCO conversion, so both give identical boxes.
    (Strictly, VOC numbers 1-based inclusive pixels, whose continuous box is `xmin - 1, ymin - 1, xmax, ymax`;
    the difference is under one pixel at the top-left.) `difficult` objects become crowd boxes.
    Class names: `class_names` in the given order (objects of other classes are dropped and counted), or all
    names found, sorted. Splits from `imagesets_dir` (e.g. ImageSets/Main) when given. Image size comes from
    `<size>`, or from the image header when absent or zero.
    """
    ann_dir, root = Path(annotation_dir), Path(image_dir).resolve()
    files = sorted(ann_dir.glob("*.xml"))
    if not files:
        raise DataError(f"{ann_dir}: no VOC .xml annotation files found")
    records = [(file, *_read_voc_xml(file)) for file in files]
    names = list(class_names) if class_names is not None else sorted(
        {name for *_, objects in records for name, _, _ in objects})
    label_of = {name: i for i, name in enumerate(names)}
    split_of = _voc_splits(Path(imagesets_dir)) if imagesets_dir is not None else {}

    parts = []
    for image_id, (file, file_name, width, height, objects) in enumerate(records, start=1):
        if not width or not height:
            try:
                width, height = image_size(root / file_name)
            except DataError as exc:
                raise DataError(f"{file}: no <size>, and {exc}") from None
        parts.append(clean_image(
            image_id, file_name, width, height, [xyxy for _, xyxy, _ in objects],
            [label_of.get(name, -1) for name, _, _ in objects], [d for *_, d in objects],
            split_of.get(file.stem),
        ))
    return build_dataset(ann_dir, root, names, parts)
