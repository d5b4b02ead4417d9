"""Importers of detection datasets into `DetectionDataset`, one module per format (`coco`, `voc`,
`labelstudio` for Label Studio JSON exports), format detection (`load_dataset`), seeded split carving
(`carve_splits`, in `common`) and export back to a COCO ground-truth dict (`to_coco_dict`, in `coco`).

Conventions shared by every importer (they all go through `clean_image` and `build_dataset`):

- Boxes become absolute xyxy (`magral_core.boxes`), clipped to the image; boxes partly outside are clipped,
  boxes of zero size or entirely outside are dropped, boxes of an unknown class are dropped; every change is
  counted in the dataset's `CleaningReport`. Images without boxes are kept, with zero boxes.
- Crowd boxes keep `iscrowd=True`: COCO evaluation ignores detections matching them, and they are not
  counted as ground truth. VOC `difficult` objects are imported as crowd boxes, which is exactly how VOC
  evaluation treats them (neither a miss when undetected nor a false positive when detected).
- Every image file must exist. Malformed input raises `DataError("<file>: <problem>")`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..structures import DetectionDataset
from .coco import load_coco, to_coco_dict
from .common import JsonReader, build_dataset, carve_splits, clean_image
from .labelstudio import load_labelstudio
from .voc import VOC_SPLITS, load_voc

__all__ = [
    "VOC_SPLITS",
    "JsonReader",
    "build_dataset",
    "carve_splits",
    "clean_image",
    "load_coco",
    "load_dataset",
    "load_labelstudio",
    "load_voc",
    "to_coco_dict",
]


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
        data = JsonReader(p).load()
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
