"""Format detection and the format-independent parts: BCCD's COCO and VOC copies agree box for box; COCO
export round trip through pycocotools; unreadable or unrecognised paths; split carving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets_helpers import write_json
from pycocotools.coco import COCO

from magral_core.datasets import carve_splits, load_coco, load_dataset, load_voc, to_coco_dict
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


# --- unreadable and unrecognised paths ----------------------------------------------------------------------


def test_unreadable_json_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON"):
        load_coco(tmp_path / "broken.json")
    with pytest.raises(DataError, match=r"absent.json: file not found"):
        load_coco(tmp_path / "absent.json")
    with pytest.raises(DataError, match=r"not a dataset"):
        load_dataset(tmp_path / "nowhere")
    write_json(tmp_path / "scalar.json", 3)
    with pytest.raises(DataError, match=r"scalar.json: expected a COCO object or a Label Studio task list"):
        load_dataset(tmp_path / "scalar.json")


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
