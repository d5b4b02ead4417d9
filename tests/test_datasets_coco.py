"""COCO importer: a hand-written COCO file with every awkward case; malformed files give one-line
DataErrors naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets_helpers import write_image, write_json

from magral_core.datasets import load_coco, load_dataset
from magral_core.errors import DataError


def _coco(tmp_path: Path) -> dict[str, Any]:
    write_image(tmp_path / "img" / "a.png", "L")  # grayscale 40 x 20
    write_image(tmp_path / "img" / "b.png")
    return {
        "images": [{"id": 7, "file_name": "img/a.png", "width": 40, "height": 20},
                   {"id": 9, "file_name": "img/b.png"}],  # size read from the file
        "categories": [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"image_id": 7, "category_id": 5, "bbox": [1, 2, 3, 4]},  # kept: (1, 2, 4, 6)
            {"image_id": 7, "category_id": 2, "bbox": [30, 10, 20, 20]},  # clipped: (30, 10, 40, 20)
            {"image_id": 7, "category_id": 2, "bbox": [5, 5, 0, 3]},  # zero width: dropped
            {"image_id": 7, "category_id": 2, "bbox": [50, 0, 5, 5]},  # outside: dropped
            {"image_id": 7, "category_id": 3, "bbox": [1, 1, 2, 2]},  # unknown category
            {"image_id": 7, "category_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 1},  # crowd, kept
        ],
    }


def test_coco_cleaning_counts_and_order(tmp_path: Path) -> None:
    ds = load_coco(write_json(tmp_path / "c.json", _coco(tmp_path)))
    assert ds.class_names == ("cat", "dog")  # category id 2 before 5
    a, b = ds.images
    np.testing.assert_array_equal(a.boxes_xyxy, [[1, 2, 4, 6], [30, 10, 40, 20], [0, 0, 10, 10]])
    np.testing.assert_array_equal(a.labels, [1, 0, 0])
    np.testing.assert_array_equal(a.iscrowd, [False, False, True])
    assert (b.image_id, b.width, b.height, b.num_boxes) == (9, 40, 20, 0)  # image without boxes kept
    r = ds.report
    assert (r.clipped, r.dropped_empty, r.dropped_outside, r.unknown_labels) == (1, 1, 1, 1)
    assert ds.path(a) == (tmp_path / "img" / "a.png").resolve()
    assert load_dataset(tmp_path / "c.json").report == r  # a COCO object detected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("categories"), "top level: missing key 'categories'"),
        (lambda d: d["annotations"][0].update(bbox="abc"), r"annotations\[0\].bbox: expected a list"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, "x", 4]), "expected a finite number, found 'x'"),
        (lambda d: d["annotations"][1].pop("image_id"), r"annotations\[1\]: missing key 'image_id'"),
        (lambda d: d["annotations"][0].update(image_id=99), "image_id 99 is not in images"),
        (lambda d: d["images"][0].update(width="wide"), r"images\[0\].width: expected an integer"),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id 7"),
        (lambda d: d["images"][0].update(file_name="img/none.png"), "1 of 2 image files not found"),
        (lambda d: d["images"][1].update(file_name="img/none.png"),
         r"images\[1\]: no width and height given, and .*none.png: image file not found"),
        (lambda d: d.update(images={}), "images: expected a list, found dict"),
        (lambda d: d["annotations"][5].update(iscrowd="yes"), r"annotations\[5\].iscrowd: expected 0 or 1"),
    ],
)
def test_malformed_coco_is_a_one_line_data_error(tmp_path: Path, change: Any, message: str) -> None:
    data = _coco(tmp_path)
    change(data)
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=message) as info:
        load_coco(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
