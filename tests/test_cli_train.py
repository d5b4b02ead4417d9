"""`magral train` / `magral evaluate`: a tiny end-to-end run, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magral_core.cli import main


@pytest.fixture()
def coco_dir(tmp_path: Path) -> Path:
    """Four 80×60 images in COCO JSON: train (one without boxes), val, test."""
    root = tmp_path / "data"
    root.mkdir()
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for i, split in enumerate(["train", "train", "val", "test"], start=1):
        pixels = np.full((60, 80, 3), 30, np.uint8)
        if i != 2:
            pixels[10:40, 15:45] = (220, 50, 50)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1,
                                "bbox": [15, 10, 30, 30], "area": 900, "iscrowd": 0})
        Image.fromarray(pixels).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 80, "height": 60, "split": split})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cell"}]}))
    return root


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_train_then_evaluate(coco_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["train", "--data", str(coco_dir), "--epochs", "1", "--batch-size", "2", "--image-size", "64",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("trained frcnn_mobilenet_v2 on 2 images") and "val: mAP" in line and "AP50" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["train_images"] == 2 and set(metrics["val"]) == {
        "map", "ap50", "per_class_ap", "per_class_ap50"}
    code = main(["evaluate", "--checkpoint", str(out / "detector.pt"), "--data", str(coco_dir),
                 "--split", "test", "--no-progress", "--json", str(tmp_path / "eval.json")])
    assert code == 0
    assert capsys.readouterr().out.startswith("frcnn_mobilenet_v2 on test (1 images): mAP")
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 1


def test_missing_dataset_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "magral train: error:", "nope")


def test_malformed_annotations_are_one_line_exit_2(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "annotations.json").write_text("{ not json")
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "annotations.json")


def test_unknown_split_is_one_line_exit_2(coco_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--data", str(coco_dir), "--train-split", "pool", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    _one_line_error(capsys, "'pool'", "train")


def test_bad_schedule_value_is_one_line_exit_2(coco_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(coco_dir), "--epochs", "0", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--epochs must be > 0")


def test_evaluate_missing_or_corrupt_checkpoint(coco_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(coco_dir)]) == 2
    _one_line_error(capsys, "magral evaluate: error:", "x.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "bad.pt"), "--data", str(coco_dir)]) == 2
    _one_line_error(capsys, "bad.pt")
