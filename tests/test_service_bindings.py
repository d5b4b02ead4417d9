"""The real bindings of a round's steps: the detector at toy size (one torch thread)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_fixtures import studio_with, toy_config

from magral_core.service import bindings, stages
from magral_core.service import staging as files
from magral_core.service.store import ModelStore
from magral_core.vision.warm_start import warm_start

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
    assert warm_start(model, model) == len(model.state_dict())


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


def test_the_pool_scored_in_chunks_is_the_pool_scored_in_one_pass(tmp_path: Path) -> None:
    # images of several sizes, so a batch's padding would show if chunking changed how images are batched
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=[])
    for task, size in zip([9, 4, 7, 5, 8], [(64, 48), (40, 60), (64, 48), (50, 30), (30, 64)], strict=True):
        studio.add_task(task, size=size)
    store = ModelStore(tmp_path / "store")
    # 3 images per chunk asked for: 4, the next multiple of the batch size, so chunks batch as one pass
    config = toy_config(tmp_path, image_size=64, epochs=1, batch_size=2, scoring_chunk=3)
    version = stages.run_round(1, client=studio, store=store, config=config, steps=bindings.default_steps())
    directory = store.version_dir(1, version)
    plan = files.RoundPlan.load(directory)
    assert (plan.scoring_chunks, plan.scoring_chunk) == (2, 4)
    chunked = files.load_pool(directory / files.POOL_FILE)
    pool = files.load_images(directory / files.IMAGES_FILE)["pool"]
    assert pool is not None and [im.image_id for im in pool.images] == [9, 4, 7, 5, 8]
    model = bindings.load_model_step(directory / files.DETECTOR_FILE)
    detections, embeddings = bindings.extract_step(model, pool, config)
    assert np.array_equal(chunked["embeddings"], embeddings)
    for a, b in zip(chunked["detections"], detections, strict=True):
        assert np.array_equal(a.boxes_xyxy, b.boxes_xyxy) and np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.class_probs, b.class_probs)
