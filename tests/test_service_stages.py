"""A round end to end at toy size: the fake Label Studio in process and toy steps with known answers (the real
bindings are tested in test_service_bindings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_fixtures import (
    LABEL_CONFIG,
    FakeAnnotation,
    FakeTask,
    ToyStrategy,
    box,
    studio_with,
    toy_config,
    toy_load,
    toy_steps,
)

from magral_core.errors import StoreError, UserError
from magral_core.service import bad_input, stages, tasks
from magral_core.service import staging as files
from magral_core.service.store import ModelStore
from magral_core.structures import Detections
from magral_core.studio.label_config import parse_label_config


# --- tests ----------------------------------------------------------------------------------------------
def test_round_end_to_end_publishes_and_pushes_ranked_predictions(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=[4, 5, 6])
    studio.add_task(
        7, [FakeAnnotation(200, (box(1, 1, 5, 5, "RBC"),), was_cancelled=True)]
    )  # still unlabeled
    store = ModelStore(tmp_path / "store")
    seen: list[str] = []
    version = stages.run_round(
        1,
        client=studio,
        store=store,
        config=toy_config(tmp_path),
        steps=toy_steps(),
        progress=lambda stage, fraction: seen.append(stage),
    )
    assert version == "magral-1-v0001"
    assert store.current_version(1) == version
    assert studio.served == [(1, version)]
    scores = {p["task"]: p["score"] for p in studio.imported}
    assert scores == {7: 0.0, 6: 1 / 3, 5: 2 / 3, 4: 1.0}  # highest task id ranked best → lowest score
    assert {p["model_version"] for p in studio.imported} == {version}
    item = studio.imported[0]["result"][0]
    # toy box (10, 10, 30, 40) px in a 64x48 image → percent
    assert item["value"]["x"] == pytest.approx(15.625) and item["value"]["height"] == pytest.approx(62.5)
    assert item["from_name"] == "label" and item["to_name"] == "image"
    assert item["value"]["rectanglelabels"] == ["RBC"]
    ranking = store.load_ranking(1, version)
    assert ranking.task_ids == (7, 6, 5, 4) and ranking.scores[0] == 0.0
    metrics = store.load_metrics(1, version)
    assert metrics["n_labeled"] == 3 and metrics["n_unlabeled"] == 4
    assert metrics["class_names"] == ["RBC", "WBC"] and metrics["strategy"] == "entropy_max"
    assert "training" in seen and "pushing" in seen
    assert not list((store.project_dir(1) / "staging").iterdir())


def test_second_round_warm_starts_and_grows_the_class_list(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=[3])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path)
    first = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    studio.label_config = LABEL_CONFIG.replace(
        '<Label value="WBC"/>', '<Label value="Platelets"/><Label value="WBC"/>'
    )
    second = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    assert (first, second) == ("magral-1-v0001", "magral-1-v0002")
    assert store.list_versions(1) == [first, second] and store.current_version(1) == second
    assert store.load_metrics(1, second)["class_names"] == ["RBC", "WBC", "Platelets"]
    model = toy_load(store.version_dir(1, second) / files.DETECTOR_FILE)
    assert model["warm"] is True and model["class_names"] == ["RBC", "WBC", "Platelets"]


def test_failed_round_keeps_the_served_version_and_records_the_error(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1], unlabeled=[2])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path)
    first = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())

    def broken_train(*args: Any) -> Any:
        raise RuntimeError("out of memory")

    steps = replace(toy_steps(), train=broken_train)
    with pytest.raises(RuntimeError, match="out of memory"):
        stages.run_round(1, client=studio, store=store, config=config, steps=steps)
    assert store.current_version(1) == first and store.list_versions(1) == [first]
    error = store.last_error(1)
    assert error is not None and "out of memory" in error["message"]
    assert not list((store.project_dir(1) / "staging").iterdir())
    assert not list((store.project_dir(1) / "reserved").iterdir())  # its name is free again


def test_publish_comes_before_label_studio_and_a_rerun_completes_the_announcement(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1], unlabeled=[2, 3])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path)
    first = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    studio.fail_import = True
    with pytest.raises(RuntimeError, match="import failed"):
        stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    second = store.current_version(1)
    assert second is not None and second != first  # published: /predict serves it
    assert studio.served == [(1, first)]  # Label Studio still samples by a version the store has
    assert not stages.announced(store, 1, second)
    error = store.last_error(1)
    assert error is not None and "import failed" in error["message"] and second in error["message"]
    studio.fail_import = False
    done = stages.announce(1, second, studio, store, keep_previous=1)
    assert done["predictions"] and done["sampling"] and done["pruned"] and stages.announced(store, 1, second)
    assert studio.served == [(1, first), (1, second)]
    pushed = [p for p in studio.imported if p["model_version"] == second]
    assert sorted(p["task"] for p in pushed) == [2, 3]
    stages.announce(1, second, studio, store, keep_previous=1)  # idempotent: nothing pushed twice
    assert len([p for p in studio.imported if p["model_version"] == second]) == 2
    assert not (store.version_dir(1, second) / "announced.json").exists()  # the version stays as published
    assert studio.served[-1] == (1, second) and len(studio.served) == 2
    for version in {v for _, v in studio.served}:
        assert version in store.list_versions(1)


def test_announcing_keeps_the_served_version_and_the_previous_ones_asked_for(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1], unlabeled=[2, 3])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, keep_prediction_versions=1)
    versions = [stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
                for _ in range(4)]
    assert {p["model_version"] for p in studio.imported} == set(versions[-2:])  # current + previous one
    stages.run_round(1, client=studio, store=store, config=toy_config(tmp_path, keep_prediction_versions=0),
                     steps=toy_steps())
    assert {p["model_version"] for p in studio.imported} == {store.current_version(1)}


def test_announce_asks_label_studio_to_delete_all_but_the_kept_versions(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1], unlabeled=[2])
    kept: list[tuple[int, list[str]]] = []
    studio.delete_predictions = lambda project, keep: kept.append((project, list(keep)))  # type: ignore[attr-defined]
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path)
    first = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    second = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    assert kept == [(1, [first]), (1, [first, second])]


def test_tasks_whose_image_fails_are_counted_with_their_reason_in_the_metrics(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1], unlabeled=[2, 3, 4])
    (studio.root / "img3.png").unlink()  # 404
    store = ModelStore(tmp_path / "store")
    original = studio.fetch_image

    def fetch(image: str, *, task_id: int) -> Path:
        if task_id == 4:
            raise UserError(f"task {task_id}: expected at most 100 pixels (MAGRAL_MAX_IMAGE_PIXELS), found 1")
        return original(image, task_id=task_id)

    studio.fetch_image = fetch  # type: ignore[method-assign]
    version = stages.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    bad = store.load_metrics(1, version)["bad_input"]
    assert bad["count"] == 2 and bad["by_reason"] == {"fetch_failed": 1, "over_pixel_limit": 1}
    assert [(b["task"], b["reason"]) for b in bad["last"]] == [(3, "fetch_failed"), (4, "over_pixel_limit")]
    assert "MAGRAL_MAX_IMAGE_PIXELS" in bad["last"][1]["message"]


def test_round_without_annotations_or_box_control_is_a_user_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    studio = studio_with(tmp_path, labeled=[], unlabeled=[1, 2])
    with pytest.raises(UserError, match="at least one annotated task"):
        stages.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    studio = studio_with(tmp_path, labeled=[1], unlabeled=[2])
    studio.label_config = (
        '<View><Image name="i" value="$image"/>'
        '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    )
    with pytest.raises(UserError, match="RectangleLabels"):
        stages.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    assert store.current_version(1) is None


def test_missing_images_are_skipped_and_counted(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=[3, 4])
    (studio.root / "img4.png").unlink()
    store = ModelStore(tmp_path / "store")
    version = stages.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    assert [p["task"] for p in studio.imported] == [3]
    assert store.load_metrics(1, version)["skipped"]["image_errors"] == 1


def test_annotated_image_converts_percent_boxes_and_drops_unknown_labels(tmp_path: Path) -> None:
    config = parse_label_config(LABEL_CONFIG)
    result = [box(10, 20, 50, 25, "WBC"), box(0, 0, 10, 10, "Ghost"), box(90, 90, 20, 20, "RBC")]
    image, dropped = tasks.annotated_image(
        5, tmp_path / "x.png", (200, 100), result, config, ("RBC", "WBC"), "train", project=1
    )
    # (10 %, 20 %, 50 %, 25 %) of 200x100 → (20, 20, 120, 45); the last box is clipped to the image
    np.testing.assert_allclose(image.boxes_xyxy, [[20, 20, 120, 45], [180, 90, 200, 100]])
    assert image.labels.tolist() == [1, 0] and dropped == 1


def test_empty_annotation_is_a_labeled_image_without_boxes(tmp_path: Path) -> None:
    config = parse_label_config(LABEL_CONFIG)
    image, dropped = tasks.annotated_image(
        5, tmp_path / "x.png", (64, 48), [], config, ("RBC",), "train", project=1
    )
    assert image.num_boxes == 0 and dropped == 0


def test_map_is_measured_on_held_out_labeled_tasks_once_there_are_enough(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=range(1, 13), unlabeled=[20])
    store = ModelStore(tmp_path / "store")
    version = stages.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    metrics = store.load_metrics(1, version)
    held_out = [t for t in range(1, 13) if tasks.is_validation(1, t)]
    assert held_out and metrics["n_validation"] == len(held_out)
    assert metrics["map"] == 0.5 and metrics["ap50"] == 0.75
    model = toy_load(store.version_dir(1, version) / files.DETECTOR_FILE)
    assert model["n_train"] == 12 - len(held_out)  # validation tasks are not trained on
    # ... and they are what the detector's training is handed to stop by
    assert sorted(model["val_ids"]) == held_out and not set(model["val_ids"]) & set(model["train_ids"])


def test_json_safe_replaces_non_finite_numbers() -> None:
    metrics = {"map": float("nan"), "ap50": 0.5, "per_class_ap": {"RBC": float("inf"), "WBC": 0.25}}
    assert stages.json_safe(metrics) == {"map": None, "ap50": 0.5, "per_class_ap": {"RBC": None, "WBC": 0.25}}


def test_validation_choice_is_stable_and_about_one_in_five() -> None:
    chosen = [tasks.is_validation(3, t) for t in range(1000)]
    assert 150 < sum(chosen) < 250
    assert chosen == [tasks.is_validation(3, t) for t in range(1000)]


def test_latest_annotation_ignores_cancelled_ones() -> None:
    old = FakeAnnotation(1, (), updated_at="2026-01-01T00:00:00Z")
    new = FakeAnnotation(2, (), updated_at="2026-02-01T00:00:00Z")
    skipped = FakeAnnotation(3, (), was_cancelled=True, updated_at="2026-03-01T00:00:00Z")
    assert tasks.latest_annotation(FakeTask(1, "x", (old, skipped, new))) is new
    assert tasks.latest_annotation(FakeTask(1, "x", (skipped,))) is None


def test_pool_arrays_round_trip(tmp_path: Path) -> None:
    dets = [
        Detections(
            np.array([[1, 2, 3, 4]], np.float32),
            np.array([0.5], np.float32),
            np.array([1]),
            np.array([[0.1, 0.2, 0.7]], np.float32),
        ),
        Detections.empty(2),
    ]
    files.save_pool(tmp_path / "p.npz", dets, np.eye(2, dtype=np.float32), np.zeros((0, 2), np.float32))
    back = files.load_pool(tmp_path / "p.npz")
    assert [len(d) for d in back["detections"]] == [1, 0]
    np.testing.assert_allclose(back["detections"][0].class_probs, [[0.1, 0.2, 0.7]])
    assert back["embeddings"].shape == (2, 2) and back["labeled_embeddings"].shape == (0, 2)


def test_magral_falls_back_when_the_pool_fits_in_one_batch(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=[3, 4])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, min_labeled_for_magral=2, budget=5)
    version = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    assert store.load_metrics(1, version)["strategy"] == "entropy_max"


def test_magral_round_caches_the_proxy_before_the_records_and_keeps_it_unpublished(tmp_path: Path) -> None:
    events: list[str] = []

    class Caching(ToyStrategy):
        def prepare(self, staging: Path) -> None:
            events.append("cache")
            (staging / files.PROXY_CACHE_FILE).write_bytes(b"frozen")

        def record(self, staging: Path, index: int) -> Mapping[str, Any]:
            events.append(f"record {index} sees {(staging / files.PROXY_CACHE_FILE).read_bytes().decode()}")
            return super().record(staging, index)

    steps = replace(toy_steps(), strategy=Caching)
    store = ModelStore(tmp_path / "store")
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=[3, 4, 5, 6])
    config = toy_config(tmp_path, min_labeled_for_magral=2, budget=2, lut_records=4)
    version = stages.run_round(1, client=studio, store=store, config=config, steps=steps)
    # two random records, then the two the (toy) first policy stage asks for
    assert events == ["cache"] + [f"record {i} sees frozen" for i in range(4)]
    assert not (store.version_dir(1, version) / files.PROXY_CACHE_FILE).exists()
    assert store.load_metrics(1, version)["lut_records"] == 4
    events.clear()  # a round under the fallback strategy has no proxy to cache
    stages.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=steps)
    assert events == []


def test_a_record_of_the_wrong_schema_fails_the_round_and_keeps_the_served_version(tmp_path: Path) -> None:
    class Broken(ToyStrategy):
        def record(self, staging: Path, index: int) -> Mapping[str, Any]:
            return {"index": index, "value": 0.1 * index}

    store = ModelStore(tmp_path / "store")
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=[3, 4, 5, 6])
    config = toy_config(tmp_path, min_labeled_for_magral=2, budget=2, lut_records=4)
    with pytest.raises(StoreError, match="expected a record"):
        steps = replace(toy_steps(), strategy=Broken)
        stages.run_round(1, client=studio, store=store, config=config, steps=steps)
    assert store.current_version(1) is None and studio.imported == []


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("task 3: image /x.png: expected an answer 200, found 404", "fetch_failed"),
        ("task 3: image /x.png: expected an image file, found 12 bytes of text/html that do not decode as "
         "an image", "not_an_image"),
        ("task 3: image /x.png: expected at most 89478485 pixels (MAGRAL_MAX_IMAGE_PIXELS), found "
         "30000x30000", "over_pixel_limit"),
    ],
)
def test_input_reason_names_why_a_task_has_no_boxes(message: str, reason: str) -> None:
    assert bad_input.input_reason(message) == reason


def test_a_round_above_the_candidate_threshold_fetches_ranks_and_predicts_only_its_candidates(
    tmp_path: Path,
) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=range(10, 40))
    fetched: list[int] = []
    fetch = studio.fetch_image

    def counting_fetch(image: str, *, task_id: int) -> Path:
        fetched.append(task_id)
        return fetch(image, task_id=task_id)

    studio.fetch_image = counting_fetch  # type: ignore[method-assign]
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, candidates_above=10, candidate_factor=3, candidate_carry=4)  # 6 random
    first = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    metrics = store.load_metrics(1, first)
    assert metrics["candidates"] == {"unlabeled": 30, "candidates": 6, "carried": 0}
    candidates = set(store.load_ranking(1, first).task_ids)
    assert len(candidates) == 6 and candidates <= set(range(10, 40))
    assert (metrics["n_unlabeled"], metrics["n_ranked"]) == (30, 6)
    assert sorted(fetched) == sorted([1, 2, 3, *candidates])  # no other task's image was fetched
    assert {p["task"] for p in studio.imported} == candidates

    # the next round carries the served ranking's best still-unlabeled tasks, then draws 6 new ones
    best = store.load_ranking(1, first).task_ids
    studio.tasks = [t if t.id != best[0] else replace(t, annotations=(FakeAnnotation(999, ()),))
                    for t in studio.tasks]
    second = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    carried = set(best[1:5])
    ranked = set(store.load_ranking(1, second).task_ids)
    assert carried <= ranked and best[0] not in ranked
    assert store.load_metrics(1, second)["candidates"] == {"unlabeled": 29, "candidates": 10, "carried": 4}


def test_a_pool_at_the_candidate_threshold_is_ranked_whole(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=range(10, 20))
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, candidates_above=10, candidate_factor=1, candidate_carry=0)
    version = stages.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    assert set(store.load_ranking(1, version).task_ids) == set(range(10, 20))
    assert store.load_metrics(1, version)["candidates"] == {}
