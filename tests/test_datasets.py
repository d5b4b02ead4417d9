"""Importers: BCCD's COCO and VOC copies agree box for box; hand-written COCO, VOC and Label Studio files with
every awkward case; malformed files give one-line DataErrors naming the file; split carving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from magral_core.datasets import (
    carve_splits,
    load_coco,
    load_dataset,
    load_labelstudio,
    load_voc,
    to_coco_dict,
)
from magral_core.errors import DataError, UserError
from magral_core.structures import DetectionDataset

# --- BCCD: the COCO JSON and the VOC XML describe the same data ---------------------------------------------


@pytest.fixture(scope="module")
def bccd_coco(bccd_root: Path) -> DetectionDataset:
    return load_dataset(bccd_root)


@pytest.fixture(scope="module")
def bccd_voc(bccd_root: Path) -> DetectionDataset:
    return load_dataset(bccd_root / "orig")


def test_bccd_coco_and_voc_agree_on_every_image(
    bccd_coco: DetectionDataset, bccd_voc: DetectionDataset
) -> None:
    assert len(bccd_coco) == len(bccd_voc) == 364
    assert bccd_coco.class_names == ("RBC", "WBC", "Platelets")  # COCO category id order
    assert bccd_voc.class_names == ("Platelets", "RBC", "WBC")  # sorted
    voc_by_path = {bccd_voc.path(im): im for im in bccd_voc.images}
    assert set(voc_by_path) == {bccd_coco.path(im) for im in bccd_coco.images}
    for coco_image in bccd_coco.images:
        voc_image = voc_by_path[bccd_coco.path(coco_image)]
        assert (voc_image.width, voc_image.height, voc_image.split) == (640, 480, coco_image.split)
        np.testing.assert_array_equal(voc_image.boxes_xyxy, coco_image.boxes_xyxy)
        assert [bccd_voc.class_names[i] for i in voc_image.labels] == [
            bccd_coco.class_names[i] for i in coco_image.labels
        ]
    assert bccd_coco.splits() == bccd_voc.splits() == {"train": 205, "val": 87, "test": 72}
    assert sum(im.num_boxes for im in bccd_coco.images) == 4886
    # The two zero-size RBC boxes the COCO conversion dropped are dropped and counted by the VOC importer.
    assert bccd_voc.report.dropped_empty == 2 and bccd_voc.report.changed == 2
    assert bccd_coco.report.changed == 0
    first = bccd_coco.images[0]  # BloodImage_00000: WBC at VOC (260, 177, 491, 376)
    np.testing.assert_array_equal(first.boxes_xyxy[0], [260, 177, 491, 376])
    assert bccd_coco.class_names[first.labels[0]] == "WBC"


def test_load_voc_with_given_class_order(bccd_root: Path, bccd_coco: DetectionDataset) -> None:
    voc = load_voc(bccd_root / "orig" / "Annotations", image_dir=bccd_root / "images",
                   class_names=["RBC", "WBC", "Platelets"])
    assert voc.splits() == {"": 364}  # no ImageSets given
    for a, b in zip(sorted(voc.images, key=lambda im: im.file_name),
                    sorted(bccd_coco.images, key=lambda im: im.file_name), strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)


def test_to_coco_dict_round_trip_and_pycocotools(bccd_coco: DetectionDataset, bccd_root: Path,
                                                  tmp_path: Path) -> None:
    gt = to_coco_dict(bccd_coco)
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 4887))
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3]
    assert gt["annotations"][0] == {
        "id": 1, "image_id": 1, "category_id": 2, "bbox": [260.0, 177.0, 231.0, 199.0], "area": 45969.0,
        "iscrowd": 0,
    }
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert len(coco.getImgIds()) == 364 and len(coco.getAnnIds()) == 4886
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    again = load_coco(tmp_path / "gt.json", image_root=bccd_root)
    assert again.class_names == bccd_coco.class_names and again.splits() == bccd_coco.splits()
    for a, b in zip(again.images, bccd_coco.images, strict=True):
        assert (a.image_id, a.file_name, a.split) == (b.image_id, b.file_name, b.split)
        np.testing.assert_array_equal(a.boxes_xyxy, b.boxes_xyxy)


# --- hand-written COCO --------------------------------------------------------------------------------------


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def _coco(tmp_path: Path) -> dict[str, Any]:
    _image(tmp_path / "img" / "a.png", "L")  # grayscale 40 x 20
    _image(tmp_path / "img" / "b.png")
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
    ds = load_coco(_write(tmp_path / "c.json", _coco(tmp_path)))
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
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=message) as info:
        load_coco(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_unreadable_json_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON"):
        load_coco(tmp_path / "broken.json")
    with pytest.raises(DataError, match=r"absent.json: file not found"):
        load_coco(tmp_path / "absent.json")
    with pytest.raises(DataError, match=r"not a dataset"):
        load_dataset(tmp_path / "nowhere")
    _write(tmp_path / "scalar.json", 3)
    with pytest.raises(DataError, match=r"scalar.json: expected a COCO object or a Label Studio task list"):
        load_dataset(tmp_path / "scalar.json")


# --- hand-written VOC ---------------------------------------------------------------------------------------


def _voc_xml(name: str, objects: list[tuple[str, tuple[float, float, float, float], int]],
             size: tuple[int, int] | None = (40, 20)) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    return f"<annotation><filename>{name}</filename>{size_xml}{objs}</annotation>"


def _voc(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem in ("x1", "x2", "x3"):
        _image(root / "JPEGImages" / f"{stem}.jpg")
    (root / "Annotations" / "x1.xml").write_text(_voc_xml("x1.jpg", [
        ("horse", (1, 2, 10, 12), 0), ("person", (5, 5, 45, 15), 1), ("zebra", (1, 1, 3, 3), 0)]))
    (root / "Annotations" / "x2.xml").write_text(_voc_xml("x2.jpg", [], size=None))  # no boxes, no size
    (root / "Annotations" / "x3.xml").write_text(_voc_xml("x3.jpg", [("horse", (3, 3, 3, 9), 0)]))
    (root / "ImageSets" / "Main" / "train.txt").write_text("x1\n")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("x1\nx2\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("x3\nnot_annotated\n")
    return root


def test_voc_difficult_unknown_and_splits(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    ds = load_voc(root / "Annotations", image_dir=root / "JPEGImages", class_names=["person", "horse"],
                  imagesets_dir=root / "ImageSets" / "Main")
    x1, x2, x3 = ds.images
    assert [im.image_id for im in ds.images] == [1, 2, 3]
    np.testing.assert_array_equal(x1.boxes_xyxy, [[1, 2, 10, 12], [5, 5, 40, 15]])
    np.testing.assert_array_equal(x1.labels, [1, 0])
    np.testing.assert_array_equal(x1.iscrowd, [False, True])  # difficult -> crowd
    assert (x2.width, x2.height, x2.num_boxes) == (40, 20, 0)
    assert x3.num_boxes == 0
    assert [im.split for im in ds.images] == ["train", "trainval", "test"]
    r = ds.report
    assert (r.clipped, r.dropped_empty, r.dropped_outside, r.unknown_labels) == (1, 1, 0, 1)
    auto = load_dataset(root)  # JPEGImages and ImageSets found, classes sorted
    assert auto.class_names == ("horse", "person", "zebra") and auto.splits() == ds.splits()


def test_voc_errors_name_the_file(tmp_path: Path) -> None:
    root = _voc(tmp_path)
    (root / "ImageSets" / "Main" / "val.txt").write_text("x1\n")
    with pytest.raises(DataError, match=r"val.txt: x1 is also listed in train.txt"):
        load_dataset(root)
    (root / "ImageSets" / "Main" / "val.txt").unlink()
    (root / "Annotations" / "x2.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"x2.xml: invalid XML"):
        load_dataset(root)
    (root / "Annotations" / "x2.xml").write_text(_voc_xml("x2.jpg", [("horse", (1, 1, 2, 2), 0)]).replace(
        "<xmax>2</xmax>", "<xmax>two</xmax>"))
    with pytest.raises(DataError, match=r"x2.xml: <xmax> expected a number, found 'two'"):
        load_dataset(root)


# --- hand-written Label Studio export -----------------------------------------------------------------------


def _rect(x: float, y: float, w: float, h: float, label: str, rotation: float = 0,
          from_name: str = "label") -> dict[str, Any]:
    return {"type": "rectanglelabels", "from_name": from_name, "to_name": "image", "original_width": 200,
            "original_height": 100, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                      "rectanglelabels": [label]}}


def _labelstudio(tmp_path: Path) -> list[dict[str, Any]]:
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        _image(tmp_path / "media" / name, size=(200, 100))
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
    path = _write(tmp_path / "export.json", _labelstudio(tmp_path))
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
    assert (ds.report.unknown_labels, ds.report.clipped) == (1, 1)
    assert ds.path(t1) == (tmp_path / "media" / "a.png").resolve()

    auto = load_dataset(path, image_root=tmp_path / "media")  # a task list is a Label Studio export
    assert auto.class_names == ("Bird", "Cat", "Dog") and len(auto) == 3


def test_labelstudio_errors(tmp_path: Path) -> None:
    tasks = _labelstudio(tmp_path)
    tasks[0]["annotations"][1]["result"].append(_rect(1, 1, 2, 2, "Cat", from_name="other"))
    path = _write(tmp_path / "export.json", tasks)
    with pytest.raises(DataError, match=r"export.json: rectangle results from several controls"):
        load_labelstudio(path, image_root=tmp_path / "media")
    assert len(load_labelstudio(path, image_root=tmp_path / "media", from_name="other").images[0].labels) == 1
    (tmp_path / "media" / "c.png").unlink()
    with pytest.raises(DataError, match=r"export.json: 1 of 3 images not found .* first: /data/local-files"):
        load_labelstudio(path, image_root=tmp_path / "media", from_name="label")
    _write(path, [{"id": 1, "annotations": []}])
    with pytest.raises(DataError, match=r"export.json: tasks\[0\]: missing key 'data'"):
        load_labelstudio(path, image_root=tmp_path)


# --- split carving ------------------------------------------------------------------------------------------


def test_carve_splits_deterministic_complete_and_order_free(bccd_coco: DetectionDataset) -> None:
    fractions = {"pool": 0.6, "val": 0.2, "test": 0.2}
    a = carve_splits(bccd_coco, fractions=fractions, seed=3)
    b = carve_splits(bccd_coco, fractions=fractions, seed=3)
    c = carve_splits(bccd_coco, fractions=fractions, seed=4)
    # 364 x (.6, .2, .2) = (218.4, 72.8, 72.8): floors 218, 72, 72; the 2 left go to the largest remainders.
    assert a.splits() == {"pool": 218, "val": 73, "test": 73}
    assert [im.split for im in a.images] == [im.split for im in b.images]
    assert [im.split for im in a.images] != [im.split for im in c.images]
    reversed_ds = carve_splits(bccd_coco.subset(range(363, -1, -1)), fractions=fractions, seed=3)
    assert {im.image_id: im.split for im in reversed_ds.images} == {im.image_id: im.split for im in a.images}
    assert [im.num_boxes for im in a.images] == [im.num_boxes for im in bccd_coco.images]


def test_carve_splits_small_and_invalid(bccd_coco: DetectionDataset) -> None:
    fractions = {"pool": 0.9, "val": 0.05, "test": 0.05}
    tiny = carve_splits(bccd_coco.subset([0, 1, 2]), fractions=fractions, seed=0)
    assert tiny.splits() == {"pool": 1, "val": 1, "test": 1}
    with pytest.raises(UserError, match=r"sum to 1"):
        carve_splits(bccd_coco, fractions={"pool": 0.5, "val": 0.2}, seed=0)
    with pytest.raises(UserError, match=r"positive"):
        carve_splits(bccd_coco, fractions={"pool": 1.2, "val": -0.2}, seed=0)
