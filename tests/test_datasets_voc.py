"""Pascal VOC importer: hand-written XML files with every awkward case (difficult objects, unknown classes,
missing sizes, ImageSets splits); malformed files give DataErrors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets_helpers import write_image

from magral_core.datasets import load_dataset, load_voc
from magral_core.errors import DataError


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
        write_image(root / "JPEGImages" / f"{stem}.jpg")
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
