"""The real bindings of a round's steps: the detector at toy size (one torch thread) and warm starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from service_fixtures import studio_with, toy_config

from magral_core.service import bindings, stages
from magral_core.service import staging as files
from magral_core.service.store import ModelStore

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_round_with_the_real_detector_at_toy_size(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=[4, 5])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, image_size=64, epochs=1, batch_size=2, prediction_threshold=0.0)
    steps = bindings.default_steps()
    version = stages.run_round(1, client=studio, store=store, config=config, steps=steps)
    assert store.current_version(1) == version
    assert sorted(p["task"] for p in studio.imported) == [4, 5]
    assert sorted(p["score"] for p in studio.imported) == [0.0, 1.0]
    model = bindings.load_model_step(store.version_dir(1, version) / files.DETECTOR_FILE)
    assert bindings.warm_start(model, model) == len(model.state_dict())


def test_warm_start_keeps_everything_but_the_class_dependent_head(tmp_path: Path) -> None:

    from magral_core.vision.detectors import build_detector

    def detector(classes: int, seed: int) -> Any:
        return build_detector(
            "frcnn_mobilenet_v2",
            num_classes=classes,
            image_size=64,
            weights_dir=tmp_path,
            pretrained=False,
            seed=seed,
        )

    previous, grown = detector(2, seed=1), detector(3, seed=2)
    fresh = {k: v.clone() for k, v in grown.state_dict().items()}
    copied = bindings.warm_start(grown, previous)
    after, before = grown.state_dict(), previous.state_dict()
    changed_shape = [k for k in after if before[k].shape != after[k].shape]
    assert changed_shape and copied == len(after) - len(changed_shape)
    for key in changed_shape:  # the new head keeps its fresh initialisation
        assert torch.equal(after[key], fresh[key])
    same = next(k for k in after if k not in changed_shape and after[k].is_floating_point())
    assert torch.equal(after[same], before[same])



def test_a_budget_round_stops_by_its_held_out_validation_tasks(tmp_path: Path, monkeypatch: Any) -> None:
    from magral_core.service import tasks
    from magral_core.vision import engine

    seen: dict[str, list[int]] = {}
    real_fit = engine.fit_detector

    def fit(model: Any, dataset: Any, config: Any, **kwargs: Any) -> Any:
        val = kwargs.get("val")
        seen["train"] = [im.image_id for im in dataset.images]
        seen["val"] = [im.image_id for im in val.images] if val is not None else []
        return real_fit(model, dataset, config, **kwargs)

    monkeypatch.setattr(engine, "fit_detector", fit)
    studio = studio_with(tmp_path, labeled=range(1, 13), unlabeled=[20, 21])
    config = toy_config(tmp_path, image_size=64, batch_size=2, schedule="budget", min_steps=2, max_steps=2,
                        eval_every=1)
    stages.run_round(1, client=studio, store=ModelStore(tmp_path / "store"), config=config,
                     steps=bindings.default_steps())
    held_out = [t for t in range(1, 13) if tasks.is_validation(1, t)]
    assert held_out and sorted(seen["val"]) == held_out
    assert sorted(seen["train"]) == [t for t in range(1, 13) if t not in held_out]
