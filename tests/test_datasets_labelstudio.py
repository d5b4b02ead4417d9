"""Label Studio export importer: a hand-written export with every awkward case (several annotations,
cancelled ones, rotated boxes, unknown labels, upload prefixes, local-files URLs, unlabeled tasks); malformed
exports give one-line DataErrors naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets_helpers import write_image, write_json

from magral_core.datasets import load_dataset, load_labelstudio
from magral_core.errors import DataError


def _rect(x: float, y: float, w: float, h: float, label: str, rotation: float = 0,
          from_name: str = "label") -> dict[str, Any]:
    return {"type": "rectanglelabels", "from_name": from_name, "to_name": "image", "original_width": 200,
            "original_height": 100, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                      "rectanglelabels": [label]}}


def _labelstudio(tmp_path: Path) -> list[dict[str, Any]]:
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        write_image(tmp_path / "media" / name, size=(200, 100))
    return [
        {"id": 1, "data": {"image": "/data/upload/3/1a2b3c4d-a.png"}, "annotations": [
            {"id": 10, "created_at": "2024-01-01T00:00:00Z", "result": [_rect(0, 0, 10, 10, "Cat")]},
            {"id": 11, "created_at": "2024-01-02T00:00:00Z", "updated_at": "2024-02-01T00:00:00Z",
             "result": [_rect(10, 20, 30, 40, "Cat"), _rect(50, 10, 20, 30, "Bird", rotation=90),
                        {"type": "choices", "from_name": "quality", "value": {"choices": ["ok"]}}]},
            {"id": 12, "created_at": "2024-03-01T00:00:00Z", "was_cancelled": True,
             "result": [_rect(0, 0, 50, 50, "Bird")]},
        ]},
        {"id": 2, "data": {"image": "/data/upload/3/b.png"}, "annotations": []},  # unlabeled
        {"id": 3, "data": {"image": "/data/local-files/?d=pics%2Fc.png"}, "annotations": [
            {"id": 13, "result": [_rect(0, 0, 10, 10, "Dog"), _rect(90, 90, 20, 20, "Bird")]}]},
        {"id": 4, "data": {"image": "/data/upload/3/d.png"}, "annotations": [
            {"id": 14, "was_cancelled": True, "result": []}]},  # only cancelled: unlabeled
        {"id": 5, "data": {"image": "s3://bucket/e.png"}, "annotations": [{"id": 15, "result": []}]},
    ]


def test_labelstudio_export(tmp_path: Path) -> None:
    path = write_json(tmp_path / "export.json", _labelstudio(tmp_path))
    ds = load_labelstudio(path, image_root=tmp_path / "media", class_names=["Cat", "Bird"])
    assert [im.image_id for im in ds.images] == [1, 3, 5]  # tasks 2 and 4 are unlabeled
    assert [im.file_name for im in ds.images] == ["a.png", "c.png", "e.png"]
    t1, t3, t5 = ds.images
    # Latest non-cancelled annotation (id 11). 200 x 100 image: (10%, 20%, 30%, 40%) -> (20, 20, 80, 60);
    # the 90 deg box at (100, 10) px, 40 x 30 px -> (70, 10, 100, 50).
    np.testing.assert_allclose(t1.boxes_xyxy, [[20, 20, 80, 60], [70, 10, 100, 50]], atol=1e-4)
    np.testing.assert_array_equal(t1.labels, [0, 1])
    # "Dog" is not a class: dropped; the Bird box from (180, 90) px is clipped to (180, 90, 200, 100).
    np.testing.assert_allclose(t3.boxes_xyxy, [[180, 90, 200, 100]], atol=1e-4)
    assert (t5.width, t5.height, t5.num_boxes, t5.split) == (200, 100, 0, None)
    assert (ds.report.unknown_labels, ds.report.clipped, ds.report.unlabeled) == (1, 1, 2)
    assert ds.report.changed == 2  # box changes only: unlabeled tasks are not counted there
    assert ds.path(t1) == (tmp_path / "media" / "a.png").resolve()

    auto = load_dataset(path, image_root=tmp_path / "media")  # a task list is a Label Studio export
    assert auto.class_names == ("Bird", "Cat", "Dog") and len(auto) == 3 and auto.report.unlabeled == 2


def test_labelstudio_errors(tmp_path: Path) -> None:
    tasks = _labelstudio(tmp_path)
    tasks[0]["annotations"][1]["result"].append(_rect(1, 1, 2, 2, "Cat", from_name="other"))
    path = write_json(tmp_path / "export.json", tasks)
    with pytest.raises(DataError, match=r"export.json: rectangle results from several controls"):
        load_labelstudio(path, image_root=tmp_path / "media")
    assert len(load_labelstudio(path, image_root=tmp_path / "media", from_name="other").images[0].labels) == 1
    tasks[2]["annotations"][0]["result"][0]["value"]["x"] = "left"
    write_json(path, tasks)
    with pytest.raises(DataError, match=r"export.json: task 3.value.x: expected a finite number, found"):
        load_labelstudio(path, image_root=tmp_path / "media", from_name="label")
    (tmp_path / "media" / "c.png").unlink()
    with pytest.raises(DataError, match=r"export.json: 1 of 3 images not found .* first: /data/local-files"):
        load_labelstudio(path, image_root=tmp_path / "media", from_name="label")
    write_json(path, [{"id": 1, "annotations": []}])
    with pytest.raises(DataError, match=r"export.json: tasks\[0\]: missing key 'data'"):
        load_labelstudio(path, image_root=tmp_path)
