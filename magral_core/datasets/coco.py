"""COCO detection JSON: `load_coco` imports it (cleaned and counted like every importer, see
`magral_core.datasets`), `to_coco_dict` writes a dataset back as the ground-truth dict pycocotools expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..boxes import coco_xywh_to_xyxy, xyxy_to_coco_xywh
from ..errors import DataError
from ..structures import DetectionDataset
from .common import JsonReader, build_dataset, clean_image
from .images import image_size


def _size_or_read(reader: JsonReader, obj: dict[str, Any], where: str, path: Path) -> tuple[int, int]:
    """`width`/`height` from a JSON object, or from the image header when absent."""
    if "width" not in obj or "height" not in obj:
        try:
            return image_size(path)
        except DataError as exc:
            reader.fail(f"{where}: no width and height given, and {exc}")
    width = reader.field(obj, "width", where, reader.as_int)
    height = reader.field(obj, "height", where, reader.as_int)
    if width <= 0 or height <= 0:
        reader.fail(f"{where}: expected a positive width and height, found {width}x{height}")
    return width, height


def load_coco(json_path: str | Path, *, image_root: str | Path | None = None) -> DetectionDataset:
    """Import a COCO detection JSON (`images`, `annotations`, `categories`).

    Class names follow category ids in increasing order (label = rank of the id). Image `file_name`s are
    relative to `image_root` (default: the JSON's directory). Optional per-image `split` strings are kept.
    `width`/`height` missing from an image are read from its header. Annotations of unknown categories are
    dropped and counted; an annotation naming an unknown image is a DataError.
    """
    source = Path(json_path)
    reader = JsonReader(source)
    data = reader.as_obj(reader.load(), "top level")
    root = Path(image_root if image_root is not None else source.parent).resolve()

    name_of: dict[int, str] = {}  # category id -> class name
    for i, raw in enumerate(reader.field(data, "categories", "", reader.as_list)):
        where = f"categories[{i}]"
        category = reader.as_obj(raw, where)
        category_id = reader.field(category, "id", where, reader.as_int)
        if category_id in name_of:
            reader.fail(f"{where}: duplicate category id {category_id}")
        name_of[category_id] = reader.field(category, "name", where, reader.as_str)
    label_of = {category_id: label for label, category_id in enumerate(sorted(name_of))}

    images: dict[int, tuple[str, int, int, str | None]] = {}  # id -> (file name, width, height, split)
    objects: dict[int, tuple[list[list[float]], list[int], list[bool]]] = {}  # id -> (xywh, labels, crowd)
    for i, raw in enumerate(reader.field(data, "images", "", reader.as_list)):
        where = f"images[{i}]"
        im = reader.as_obj(raw, where)
        image_id = reader.field(im, "id", where, reader.as_int)
        if image_id in images:
            reader.fail(f"{where}: duplicate image id {image_id}")
        file_name = reader.field(im, "file_name", where, reader.as_str)
        split = reader.as_str(im["split"], f"{where}.split") if im.get("split") is not None else None
        images[image_id] = (file_name, *_size_or_read(reader, im, where, root / file_name), split)
        objects[image_id] = ([], [], [])

    for i, raw in enumerate(reader.as_list(data.get("annotations", []), "annotations")):
        where = f"annotations[{i}]"
        ann = reader.as_obj(raw, where)
        image_id = reader.field(ann, "image_id", where, reader.as_int)
        if image_id not in images:
            reader.fail(f"{where}: image_id {image_id} is not in images")
        bbox = reader.field(ann, "bbox", where, reader.as_list)
        if len(bbox) != 4:
            reader.fail(f"{where}.bbox: expected [x, y, width, height], found {bbox!r}")
        category_id = reader.field(ann, "category_id", where, reader.as_int)
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):  # 0/1 as COCO writes it; true/false compare equal and are accepted too
            reader.fail(f"{where}.iscrowd: expected 0 or 1, found {crowd!r}")
        boxes, labels, crowds = objects[image_id]
        boxes.append([reader.as_num(v, f"{where}.bbox") for v in bbox])
        labels.append(label_of.get(category_id, -1))
        crowds.append(bool(crowd))

    parts = []
    for image_id, (file_name, width, height, split) in images.items():
        boxes, labels, crowds = objects[image_id]
        parts.append(clean_image(image_id, file_name, width, height, coco_xywh_to_xyxy(boxes), labels, crowds,
                                 split))
    return build_dataset(source, root, [name_of[c] for c in sorted(name_of)], parts)


def to_coco_dict(dataset: DetectionDataset) -> dict[str, Any]:
    """A COCO ground-truth dict of `dataset`, as pycocotools expects it.

    Image ids are the images' `image_id`s (must be unique); category ids are label + 1 in `class_names`
    order; annotation ids run from 1 in image order; `bbox` is absolute xywh, `area` its width x height;
    `iscrowd` 0/1. Images keep their `split` when they have one, so `load_coco` reads the dict back unchanged.
    """
    ids = [im.image_id for im in dataset.images]
    if len(set(ids)) != len(ids):
        raise ValueError("to_coco_dict: image ids must be unique within the dataset")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for im in dataset.images:
        record: dict[str, Any] = {"id": im.image_id, "file_name": im.file_name, "width": im.width,
                                  "height": im.height}
        if im.split is not None:
            record["split"] = im.split
        images.append(record)
        for box, label, crowd in zip(xyxy_to_coco_xywh(im.boxes_xyxy), im.labels, im.iscrowd, strict=True):
            x, y, w, h = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": im.image_id,
                                "category_id": int(label) + 1, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": int(crowd)})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(dataset.class_names)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}
