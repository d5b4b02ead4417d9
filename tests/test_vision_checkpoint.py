"""Checkpoints describe themselves, round-trip exactly, are written atomically and fail with UserError."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from magral_core.errors import UserError
from magral_core.vision.checkpoint import FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from magral_core.vision.detectors import build_detector, detector_spec


def test_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path, seed=1)
    cast(Any, model).roi_heads.score_thresh = 0.0
    with torch.no_grad():  # move the weights off their initial values so the test can fail
        cast(Any, model).roi_heads.box_predictor.cls_score.bias.add_(0.3)
    path = save_checkpoint(tmp_path / "out" / "det.pt", model, meta={"class_names": ["a", "b"], "round": 3})
    assert [p.name for p in path.parent.iterdir()] == ["det.pt"]  # no temporary file left behind

    loaded, info = load_checkpoint(path)
    assert info == {"detector": "frcnn_mobilenet_v2", "kwargs": {"num_classes": 2, "image_size": 64},
                    "class_names": ["a", "b"], "meta": {"class_names": ["a", "b"], "round": 3}}
    assert detector_spec(loaded) == detector_spec(model)
    cast(Any, loaded).roi_heads.score_thresh = 0.0
    model.eval()
    image = [torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    assert len(a["scores"]) > 0
    for key in ("boxes", "scores", "labels", "class_probs"):
        assert torch.equal(a[key], b[key]), key


def test_explicit_class_names_win_and_must_match(tmp_path: Path) -> None:
    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
    save_checkpoint(tmp_path / "c.pt", model, meta={}, class_names=("x", "y"))
    assert read_checkpoint(tmp_path / "c.pt")["class_names"] == ["x", "y"]
    with pytest.raises(ValueError, match="2 classes but 3 class names"):
        save_checkpoint(tmp_path / "d.pt", model, meta={"class_names": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="class names missing"):
        save_checkpoint(tmp_path / "d.pt", model, meta={})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "d.pt", model, meta={"class_names": ["a", "b"], "bad": object()})
    assert not (tmp_path / "d.pt").exists()


def test_bad_files_raise_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "other/9"}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=f"expected format '{FORMAT}'"):
        load_checkpoint(tmp_path / "other.pt")
    # weights-only loading refuses arbitrary pickled objects
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps(Path("x"), protocol=2))
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path / "pickle.pt")
    model = build_detector("frcnn_mobilenet_v2", num_classes=2, image_size=64, weights_dir=tmp_path)
    path = save_checkpoint(tmp_path / "ok.pt", model, meta={"class_names": ["a", "b"]})
    payload = torch.load(path, weights_only=True)
    payload["kwargs"]["num_classes"] = 5
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt")
