"""Importers of detection datasets (COCO JSON, Pascal VOC XML, Label Studio JSON export) into
`DetectionDataset`, seeded split carving, and export back to a COCO ground-truth dict.

Conventions shared by every importer:

- Boxes become absolute xyxy (`magral_core.boxes`), clipped to the image; boxes partly outside are clipped,
  boxes of zero size or entirely outside are dropped, boxes of an unknown class are dropped; every change is
  counted in the dataset's `CleaningReport`. Images without boxes are kept, with zero boxes.
- Crowd boxes keep `iscrowd=True`: COCO evaluation ignores detections matching them, and they are not
  counted as ground truth. VOC `difficult` objects are imported as crowd boxes, which is exactly how VOC
  evaluation treats them (neither a miss when undetected nor a false positive when detected).
- Every image file must exist. Malformed input raises `DataError("<file>: <problem>")`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from .boxes import (
    BoxesLike,
    clip_boxes_xyxy,
    coco_xywh_to_xyxy,
    labelstudio_percent_to_xyxy,
    xyxy_to_coco_xywh,
)
from .errors import DataError, UserError
from .images import image_size
from .structures import AnnotatedImage, CleaningReport, DetectionDataset

log = logging.getLogger(__name__)

VOC_SPLITS = ("train", "val", "test")
"""ImageSets/Main files read as splits; `trainval.txt` only names images listed in none of them."""

_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio prefixes uploaded file names with 8 hex digits


# --- shared cleaning --------------------------------------------------------------------------------------


def _clean_image(
    image_id: int,
    file_name: str,
    width: int,
    height: int,
    boxes_xyxy: BoxesLike,
    labels: Sequence[int],
    iscrowd: Sequence[bool],
    split: str | None,
) -> tuple[AnnotatedImage, CleaningReport]:
    """Drop boxes of unknown class (label -1), clip the rest to the image, drop empty and outside ones."""
    label_array = np.asarray(labels, np.int64).reshape(-1)
    known = label_array >= 0
    clip = clip_boxes_xyxy(np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)[known], width, height)
    keep = clip.keep
    image = AnnotatedImage(
        image_id=image_id,
        file_name=file_name,
        width=width,
        height=height,
        boxes_xyxy=clip.boxes[keep].astype(np.float32),
        labels=label_array[known][keep],
        iscrowd=np.asarray(iscrowd, bool).reshape(-1)[known][keep],
        split=split,
    )
    report = CleaningReport(clip.num_clipped, clip.num_empty, clip.num_outside, int((~known).sum()))
    return image, report


def _build(
    source: Path, root: Path, class_names: Sequence[str], parts: list[tuple[AnnotatedImage, CleaningReport]]
) -> DetectionDataset:
    missing = [im.file_name for im, _ in parts if not (root / im.file_name).is_file()]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(parts)} image files not found under {root}, "
            f"first: {missing[0]}"
        )
    report = sum((r for _, r in parts), CleaningReport())
    dataset = DetectionDataset(root, tuple(class_names), tuple(im for im, _ in parts), report)
    log.info(
        "loaded dataset file=%s images=%d boxes=%d classes=%d splits=%s clipped=%d dropped_empty=%d "
        "dropped_outside=%d unknown_labels=%d",
        source, len(dataset), sum(im.num_boxes for im in dataset.images), dataset.num_classes,
        dataset.splits(), report.clipped, report.dropped_empty, report.dropped_outside, report.unknown_labels,
    )
    return dataset


# --- JSON field access with one-line errors -----------------------------------------------------------------


class _Json:
    """Typed access to parsed JSON; every failure is a DataError naming the file and the field."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, problem: str) -> NoReturn:
        raise DataError(f"{self.file}: {problem}")

    def load(self) -> Any:
        try:
            with open(self.file, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            self.fail("file not found")
        except (OSError, UnicodeDecodeError) as exc:
            self.fail(f"cannot read ({exc})")
        except json.JSONDecodeError as exc:
            self.fail(f"invalid JSON ({exc})")

    def as_obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"{where}: expected an object, found {type(value).__name__}")
        return value

    def as_list(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(f"{where}: expected a list, found {type(value).__name__}")
        return value

    def key(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            self.fail(f"{where}: missing key {key!r}")
        return obj[key]

    def as_int(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            self.fail(f"{where}: expected an integer, found {value!r}")
        return int(value)

    def as_num(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(f"{where}: expected a finite number, found {value!r}")
        return float(value)

    def as_str(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(f"{where}: expected a non-empty string, found {value!r}")
        return value


def _size_or_read(reader: _Json, obj: dict[str, Any], where: str, path: Path) -> tuple[int, int]:
    """`width`/`height` from a JSON object, or from the image header when absent."""
    if "width" not in obj or "height" not in obj:
        try:
            return image_size(path)
        except DataError as exc:
            reader.fail(f"{where}: no width and height given, and {exc}")
    width = reader.as_int(obj["width"], f"{where}.width")
    height = reader.as_int(obj["height"], f"{where}.height")
    if width <= 0 or height <= 0:
        reader.fail(f"{where}: expected a positive width and height, found {width}x{height}")
    return width, height


# --- COCO ------------------------------------------------------------------------------------------------


def load_coco(json_path: str | Path, *, image_root: str | Path | None = None) -> DetectionDataset:
    """Import a COCO detection JSON (`images`, `annotations`, `categories`).

    Class names follow category ids in increasing order (label = rank of the id). Image `file_name`s are
    relative to `image_root` (default: the JSON's directory). Optional per-image `split` strings are kept.
    `width`/`height` missing from an image are read from its header. Annotations of unknown categories are
    dropped and counted; an annotation naming an unknown image is a DataError.
    """
    source = Path(json_path)
    reader = _Json(source)
    data = reader.as_obj(reader.load(), "top level")
    root = Path(image_root if image_root is not None else source.parent).resolve()

    categories = [reader.as_obj(c, f"categories[{i}]") for i, c in enumerate(
        reader.as_list(reader.key(data, "categories", "top level"), "categories"))]
    category_ids = [reader.as_int(reader.key(c, "id", f"categories[{i}]"), f"categories[{i}].id")
                    for i, c in enumerate(categories)]
    if len(set(category_ids)) != len(category_ids):
        reader.fail(f"categories: duplicate ids in {category_ids}")
    by_id = sorted(zip(category_ids, range(len(categories)), strict=True))
    class_names = [
        reader.as_str(reader.key(categories[i], "name", f"categories[{i}]"), f"categories[{i}].name")
        for _, i in by_id
    ]
    label_of = {cid: label for label, (cid, _) in enumerate(by_id)}

    entries: dict[int, dict[str, Any]] = {}
    for i, raw in enumerate(reader.as_list(reader.key(data, "images", "top level"), "images")):
        where = f"images[{i}]"
        im = reader.as_obj(raw, where)
        image_id = reader.as_int(reader.key(im, "id", where), f"{where}.id")
        if image_id in entries:
            reader.fail(f"{where}: duplicate image id {image_id}")
        file_name = reader.as_str(reader.key(im, "file_name", where), f"{where}.file_name")
        split = im.get("split")
        if split is not None:
            split = reader.as_str(split, f"{where}.split")
        width, height = _size_or_read(reader, im, where, root / file_name)
        entries[image_id] = {"file_name": file_name, "width": width, "height": height, "split": split,
                             "boxes": [], "labels": [], "iscrowd": []}

    for i, raw in enumerate(reader.as_list(data.get("annotations", []), "annotations")):
        where = f"annotations[{i}]"
        ann = reader.as_obj(raw, where)
        image_id = reader.as_int(reader.key(ann, "image_id", where), f"{where}.image_id")
        if image_id not in entries:
            reader.fail(f"{where}: image_id {image_id} is not in images")
        bbox = reader.as_list(reader.key(ann, "bbox", where), f"{where}.bbox")
        if len(bbox) != 4:
            reader.fail(f"{where}.bbox: expected [x, y, width, height], found {bbox!r}")
        category = reader.as_int(reader.key(ann, "category_id", where), f"{where}.category_id")
        entry = entries[image_id]
        entry["boxes"].append([reader.as_num(v, f"{where}.bbox") for v in bbox])
        entry["labels"].append(label_of.get(category, -1))
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):  # 0/1 as COCO writes it; true/false compare equal and are accepted too
            reader.fail(f"{where}.iscrowd: expected 0 or 1, found {crowd!r}")
        entry["iscrowd"].append(bool(crowd))

    parts = [
        _clean_image(image_id, e["file_name"], e["width"], e["height"],
                     coco_xywh_to_xyxy(np.asarray(e["boxes"], np.float64).reshape(-1, 4)),
                     e["labels"], e["iscrowd"], e["split"])
        for image_id, e in entries.items()
    ]
    return _build(source, root, class_names, parts)


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


# --- Pascal VOC ------------------------------------------------------------------------------------------


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
            stem = line.split()[0] if line.split() else ""
            if not stem:
                continue
            if split == "trainval":
                split_of.setdefault(stem, split)
            elif split_of.get(stem, split) != split:
                raise DataError(f"{listing}: {stem} is also listed in {split_of[stem]}.txt")
            else:
                split_of[stem] = split
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
        parts.append(_clean_image(
            image_id, file_name, width, height, [xyxy for _, xyxy, _ in objects],
            [label_of.get(name, -1) for name, _, _ in objects], [d for *_, d in objects],
            split_of.get(file.stem),
        ))
    return _build(ann_dir, root, names, parts)


# --- Label Studio export ---------------------------------------------------------------------------------


def _labelstudio_file_name(url: str) -> str:
    """The file name in a Label Studio image URL: `/data/upload/3/abc-x.jpg`, `...?d=dir/x.jpg`, `s3://b/x`."""
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d")  # local-files storage: /data/local-files/?d=<path>
    return PurePosixPath(unquote(local[0] if local else parsed.path)).name


def _latest_annotation(reader: _Json, task: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The most recently updated (then created, then highest id) non-cancelled annotation, or None."""
    candidates = []
    for j, raw in enumerate(reader.as_list(task.get("annotations") or [], f"{where}.annotations")):
        ann = reader.as_obj(raw, f"{where}.annotations[{j}]")
        if ann.get("was_cancelled"):
            continue
        stamp = ann.get("updated_at") or ann.get("created_at")
        try:
            when = datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else -math.inf
        except ValueError:
            reader.fail(f"{where}.annotations[{j}]: unreadable timestamp {stamp!r}")
        ident = ann.get("id")
        candidates.append((when, ident if isinstance(ident, int) else -1, j, ann))
    return max(candidates, key=lambda c: c[:3])[3] if candidates else None


def _labelstudio_label(result: dict[str, Any]) -> str | None:
    """The one label of a rectangle result, or None when it has none or several."""
    value = result.get("value")
    names = value.get("rectanglelabels") if isinstance(value, dict) else None
    if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str):
        return names[0]
    return None


def _labelstudio_rects(
    reader: _Json, tasks: list[Any], *, from_name: str | None, image_key: str
) -> list[tuple[int, str, list[dict[str, Any]]]]:
    """(task id, image URL, rectangle results of the latest usable annotation) per labeled task."""
    labeled: list[tuple[int, str, list[dict[str, Any]]]] = []
    controls: set[str] = set()
    for i, raw in enumerate(tasks):
        where = f"tasks[{i}]"
        task = reader.as_obj(raw, where)
        data = reader.as_obj(reader.key(task, "data", where), f"{where}.data")
        url = reader.as_str(reader.key(data, image_key, f"{where}.data"), f"{where}.data.{image_key}")
        annotation = _latest_annotation(reader, task, where)
        if annotation is None:
            continue
        results = [reader.as_obj(r, f"{where}.result")
                   for r in reader.as_list(annotation.get("result") or [], f"{where}.result")]
        rects = [r for r in results if r.get("type") == "rectanglelabels"
                 and (from_name is None or r.get("from_name") == from_name)]
        controls.update(str(r.get("from_name")) for r in rects)
        labeled.append((reader.as_int(task.get("id", i + 1), f"{where}.id"), url, rects))
    if len(controls) > 1:
        reader.fail(f"rectangle results from several controls {sorted(controls)}; pass from_name")
    if len({task_id for task_id, _, _ in labeled}) != len(labeled):
        reader.fail("duplicate task ids")
    return labeled


def _labelstudio_image(
    reader: _Json, task_id: int, path: Path, rects: list[dict[str, Any]], label_of: Mapping[str, int]
) -> tuple[AnnotatedImage, CleaningReport]:
    where = f"task {task_id}"
    boxes, rotations = [], []
    for r in rects:
        value = reader.as_obj(reader.key(r, "value", where), f"{where} value")
        boxes.append([reader.as_num(reader.key(value, k, f"{where} value"), f"{where} value.{k}")
                      for k in ("x", "y", "width", "height")])
        rotations.append(reader.as_num(value.get("rotation", 0), f"{where} value.rotation"))
        if reader.as_num(r.get("image_rotation", 0), f"{where} image_rotation") != 0:
            reader.fail(f"{where}: image_rotation is not supported (expected 0)")
    if rects:
        width = reader.as_int(reader.key(rects[0], "original_width", where), f"{where} original_width")
        height = reader.as_int(reader.key(rects[0], "original_height", where), f"{where} original_height")
    else:
        width, height = image_size(path)
    xyxy = labelstudio_percent_to_xyxy(np.asarray(boxes, np.float64).reshape(-1, 4), width, height, rotations)
    labels = [label_of.get(name, -1) if name is not None else -1 for name in map(_labelstudio_label, rects)]
    return _clean_image(task_id, path.name, width, height, xyxy, labels, [False] * len(rects), None)


def load_labelstudio(
    json_path: str | Path,
    *,
    image_root: str | Path,
    from_name: str | None = None,
    class_names: Sequence[str] | None = None,
    image_key: str = "image",
) -> DetectionDataset:
    """Import a Label Studio JSON export (a list of tasks) of `rectanglelabels` results.

    Per task, the latest non-cancelled annotation is used (by `updated_at`, then `created_at`, then id).
    Tasks with no such annotation are unlabeled: excluded from the dataset, their count logged. An annotation
    with no boxes gives an image with zero boxes. Results are read from the `from_name` control, or from the
    only control with rectangle results (a DataError if there are several). Each box needs exactly one label;
    boxes with none or several, or whose label is not in `class_names`, are dropped and counted as unknown.
    Rotated boxes become the axis-aligned box enclosing them. Class names: `class_names` in order, or all
    labels found, sorted. The image URL `data[image_key]` is resolved by file name in `image_root`, also with
    Label Studio's upload prefix (`1a2b3c4d-`) removed. Image ids are task ids; images have no split.
    """
    source, root = Path(json_path), Path(image_root).resolve()
    reader = _Json(source)
    tasks = reader.as_list(reader.load(), "top level (a Label Studio JSON export is a list of tasks)")
    labeled = _labelstudio_rects(reader, tasks, from_name=from_name, image_key=image_key)
    found = sorted({name for _, _, rects in labeled for name in map(_labelstudio_label, rects) if name})
    names = list(class_names) if class_names is not None else found
    label_of = {name: i for i, name in enumerate(names)}

    parts, missing = [], []
    for task_id, url, rects in labeled:
        file_name = _labelstudio_file_name(url)
        candidates = [root / file_name, root / _UPLOAD_PREFIX.sub("", file_name, count=1)]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(url)
        else:
            parts.append(_labelstudio_image(reader, task_id, path, rects, label_of))
    if missing:
        reader.fail(f"{len(missing)} of {len(labeled)} images not found in {root}, first: {missing[0]}")
    log.info("label studio export file=%s tasks=%d labeled=%d unlabeled_excluded=%d",
             source, len(tasks), len(labeled), len(tasks) - len(labeled))
    return _build(source, root, names, parts)


# --- detection and splits ----------------------------------------------------------------------------------


def _voc_image_dir(voc_dir: Path) -> Path:
    for candidate in (voc_dir / "JPEGImages", voc_dir / "images", voc_dir.parent / "images",
                      voc_dir.parent / "JPEGImages"):
        if candidate.is_dir():
            return candidate
    raise DataError(f"{voc_dir}: VOC annotations found but no image folder (JPEGImages/ or images/ here or "
                    "beside it)")


def load_dataset(path: str | Path, *, image_root: str | Path | None = None) -> DetectionDataset:
    """Import a dataset, detecting its format from `path`:

    - a directory with `annotations.json`: COCO;
    - a `.json` file: COCO when it holds an object, a Label Studio export when it holds a list (images are
      looked up in `image_root`, default the file's directory);
    - a directory with `Annotations/` (VOC XML): images from `JPEGImages/` or `images/` in it, or `images/`
      beside it (BCCD's `orig/` layout); splits from `ImageSets/Main` when present.
    """
    p = Path(path)
    if p.is_dir() and (p / "annotations.json").is_file():
        return load_coco(p / "annotations.json", image_root=image_root)
    if p.is_dir() and (p / "Annotations").is_dir():
        imagesets = p / "ImageSets" / "Main"
        return load_voc(p / "Annotations", image_dir=image_root or _voc_image_dir(p),
                        imagesets_dir=imagesets if imagesets.is_dir() else None)
    if p.is_file() and p.suffix.lower() == ".json":
        data = _Json(p).load()
        if isinstance(data, dict):
            return load_coco(p, image_root=image_root)
        if isinstance(data, list):
            return load_labelstudio(p, image_root=image_root or p.parent)
        raise DataError(
            f"{p}: expected a COCO object or a Label Studio task list, found {type(data).__name__}"
        )
    raise DataError(
        f"{p}: not a dataset; expected a COCO .json, a Label Studio export .json, a directory with "
        "annotations.json, or a VOC directory with Annotations/"
    )


def carve_splits(dataset: DetectionDataset, *, fractions: Mapping[str, float], seed: int) -> DetectionDataset:
    """Assign every image to one of the splits named in `fractions`, replacing any split it had.

    Counts are `fraction x N` rounded by largest remainder (ties to the earlier split), so they sum to N;
    when N is at least the number of splits, every split gets at least one image. Images are shuffled by
    `np.random.default_rng(seed)` in image-id order, so the result depends only on the seed, the fractions
    (and their order) and the set of image ids, not on the order of `dataset.images`. Raises UserError when
    a fraction is not positive or they do not sum to 1.
    """
    names = list(fractions)
    shares = np.array([fractions[n] for n in names], np.float64)
    if not names or (shares <= 0).any() or abs(shares.sum() - 1.0) > 1e-6:
        raise UserError(f"split fractions must be positive and sum to 1, found {dict(fractions)}")
    n = len(dataset)
    exact = shares * n
    counts = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    if n >= len(names):
        for k in np.flatnonzero(counts == 0):
            counts[np.argmax(counts)] -= 1
            counts[k] = 1
    order = sorted(range(n), key=lambda i: dataset.images[i].image_id)
    shuffled = np.asarray(order, np.int64)[np.random.default_rng(seed).permutation(n)]
    split_of = np.repeat(np.arange(len(names)), counts)  # (N,) split index per shuffled position
    assigned = {int(i): names[s] for i, s in zip(shuffled, split_of, strict=True)}
    images = tuple(replace(im, split=assigned[i]) for i, im in enumerate(dataset.images))
    return replace(dataset, images=images)
