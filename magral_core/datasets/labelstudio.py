"""Importer of a Label Studio JSON export (a list of tasks with `rectanglelabels` results) into
`DetectionDataset`, cleaned and counted like every other importer (see `magral_core.datasets`).

Label Studio boxes are percent of the image, top-left x/y/width/height plus a rotation; they are converted by
`magral_core.boxes.labelstudio_percent_to_xyxy`. Malformed input raises `DataError("<file>: <problem>")`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from ..boxes import labelstudio_percent_to_xyxy
from ..structures import AnnotatedImage, CleaningReport, DetectionDataset
from .common import JsonReader, build_dataset, clean_image
from .images import image_size

_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio prefixes uploaded file names with 8 hex digits


def _image_path(root: Path, url: str) -> Path | None:
    """The file in `root` named by an image URL (`/data/upload/3/1a2b3c4d-x.jpg`, `...?d=dir/x.jpg`,
    `s3://b/x.jpg`), with or without the upload prefix; None when neither exists."""
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d")  # local-files storage: /data/local-files/?d=<path>
    name = PurePosixPath(unquote(local[0] if local else parsed.path)).name
    return next((p for p in (root / name, root / _UPLOAD_PREFIX.sub("", name, count=1)) if p.is_file()), None)


def _latest_annotation(reader: JsonReader, task: dict[str, Any], where: str) -> dict[str, Any] | None:
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


def _label(result: dict[str, Any]) -> str | None:
    """The one label of a rectangle result, or None when it has none or several."""
    value = result.get("value")
    names = value.get("rectanglelabels") if isinstance(value, dict) else None
    if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str):
        return names[0]
    return None


def _labeled_tasks(
    reader: JsonReader, tasks: list[Any], *, from_name: str | None, image_key: str
) -> list[tuple[int, str, list[dict[str, Any]]]]:
    """(task id, image URL, rectangle results of the latest usable annotation) per labeled task."""
    labeled: list[tuple[int, str, list[dict[str, Any]]]] = []
    controls: set[str] = set()
    for i, raw in enumerate(tasks):
        where = f"tasks[{i}]"
        task = reader.as_obj(raw, where)
        data = reader.field(task, "data", where, reader.as_obj)
        url = reader.field(data, image_key, f"{where}.data", reader.as_str)
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


def _task_image(
    reader: JsonReader, task_id: int, path: Path, rects: list[dict[str, Any]], label_of: Mapping[str, int]
) -> tuple[AnnotatedImage, CleaningReport]:
    where = f"task {task_id}"
    boxes, rotations = [], []
    for r in rects:
        value = reader.field(r, "value", where, reader.as_obj)
        boxes.append([reader.field(value, k, f"{where}.value", reader.as_num)
                      for k in ("x", "y", "width", "height")])
        rotations.append(reader.as_num(value.get("rotation", 0), f"{where}.value.rotation"))
        if reader.as_num(r.get("image_rotation", 0), f"{where}.image_rotation") != 0:
            reader.fail(f"{where}: image_rotation is not supported (expected 0)")
    if rects:
        width = reader.field(rects[0], "original_width", where, reader.as_int)
        height = reader.field(rects[0], "original_height", where, reader.as_int)
    else:
        width, height = image_size(path)
    xyxy = labelstudio_percent_to_xyxy(np.asarray(boxes, np.float64).reshape(-1, 4), width, height, rotations)
    labels = [label_of.get(name, -1) if name is not None else -1 for name in map(_label, rects)]
    return clean_image(task_id, path.name, width, height, xyxy, labels, [False] * len(rects), None)


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
    Tasks with no such annotation are unlabeled: left out of the dataset and counted in its report's
    `unlabeled`. An annotation with no boxes gives an image with zero boxes. Results are read from the
    `from_name` control, or from the only control with rectangle results (a DataError if there are several).
    Each box needs exactly one label; boxes with none or several, or whose label is not in `class_names`, are
    dropped and counted as unknown. Rotated boxes become the axis-aligned box enclosing them. Class names:
    `class_names` in order, or all labels found, sorted. The image URL `data[image_key]` is resolved by file
    name in `image_root`, also with Label Studio's upload prefix (`1a2b3c4d-`) removed. Image ids are task
    ids; images have no split.
    """
    source, root = Path(json_path), Path(image_root).resolve()
    reader = JsonReader(source)
    tasks = reader.as_list(reader.load(), "top level (a Label Studio JSON export is a list of tasks)")
    labeled = _labeled_tasks(reader, tasks, from_name=from_name, image_key=image_key)
    names = list(class_names) if class_names is not None else sorted(
        {name for _, _, rects in labeled for name in map(_label, rects) if name})
    label_of = {name: i for i, name in enumerate(names)}

    parts, missing = [], []
    for task_id, url, rects in labeled:
        path = _image_path(root, url)
        if path is None:
            missing.append(url)
        else:
            parts.append(_task_image(reader, task_id, path, rects, label_of))
    if missing:
        reader.fail(f"{len(missing)} of {len(labeled)} images not found in {root}, first: {missing[0]}")
    return build_dataset(source, root, names, parts, unlabeled=len(tasks) - len(labeled))
