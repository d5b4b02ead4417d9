"""A round end to end at toy size: a fake Label Studio in process, toy steps (known answers) and one run of
the real detector on tiny images. Also the fakes the job and backend tests reuse."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from magral_core import rounds
from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.label_config import parse_label_config
from magral_core.store import ModelStore
from magral_core.structures import DetectionDataset, Detections

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="RBC"/><Label value="WBC"/>
  </RectangleLabels>
</View>"""


# --- a fake Label Studio (same methods as magral_core.labelstudio.LabelStudioClient) ------------------------
@dataclass(frozen=True)
class FakeAnnotation:
    id: int
    result: tuple[Mapping[str, Any], ...]
    was_cancelled: bool = False
    updated_at: str = "2026-01-01T00:00:00Z"


@dataclass(frozen=True)
class FakeTask:
    id: int
    image: str
    annotations: tuple[FakeAnnotation, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)


def box(x: float, y: float, w: float, h: float, label: str) -> dict[str, Any]:
    """A rectanglelabels result item in percent."""
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
    }


class FakeStudio:
    """In-process Label Studio: tasks with tiny PNG images, and a log of what the backend pushed."""

    def __init__(self, root: Path, label_config: str = LABEL_CONFIG) -> None:
        self.root = root
        self.label_config = label_config
        self.tasks: list[FakeTask] = []
        self.imported: list[dict[str, Any]] = []
        self.served: list[tuple[int, str]] = []
        self.headers: list[tuple[int, str, dict[str, str]]] = []
        self.fail_import = False

    def add_task(self, task_id: int, annotations: Sequence[FakeAnnotation] = (), *, size=(64, 48)) -> None:
        path = self.root / f"img{task_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(task_id)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        url = f"/data/upload/1/img{task_id}.png"
        self.tasks.append(FakeTask(task_id, url, tuple(annotations), {"image": url}))

    def get_project(self, project_id: int) -> Mapping[str, Any]:
        return {"id": project_id, "label_config": self.label_config, "model_version": ""}

    def list_tasks(self, project_id: int, *, image_key: str | None = None) -> list[FakeTask]:
        assert image_key in (None, "image")
        return list(self.tasks)

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        if self.fail_import:
            raise RuntimeError(f"import failed: created 0 of {len(predictions)}")
        self.imported.extend(dict(p) for p in predictions)
        return len(predictions)

    def serve_in_ranked_order(self, project_id: int, model_version: str) -> None:
        self.served.append((project_id, model_version))

    def add_webhook_header(self, project_id: int, prefix: str, headers: Mapping[str, str]) -> int:
        self.headers.append((project_id, prefix, dict(headers)))
        return 1

    def fetch_image(self, image: str, *, task_id: int) -> Path:
        path = self.root / image.rsplit("/", 1)[-1]
        if not path.is_file():
            raise UserError(f"image {image} of task {task_id}: 404")
        return path


# --- toy steps: no torch, known answers ------------------------------------------------------------------
def toy_train(dataset: DetectionDataset, previous: Path | None, config: Config, progress) -> dict[str, Any]:
    progress("training", 1.0)
    return {"class_names": list(dataset.class_names), "n_train": len(dataset), "warm": previous is not None}


def toy_extract(model: Any, dataset: DetectionDataset, config: Config) -> tuple[list[Detections], np.ndarray]:
    """One box (10, 10, 30, 40) of class 0 per image, score 0.9; embedding = (task id, width)."""
    dets = [
        Detections(np.array([[10, 10, 30, 40]], np.float32), np.array([0.9], np.float32), np.array([0]), None)
        for _ in dataset.images
    ]
    emb = np.array([[im.image_id, im.width] for im in dataset.images], np.float32).reshape(-1, 2)
    return dets, emb


def toy_save(model: Any, path: Path, meta: Mapping[str, Any]) -> None:
    path.write_text(json.dumps({"model": model, "meta": dict(meta)}))


def toy_load(path: Path) -> Any:
    return json.loads(path.read_text())["model"]


def toy_rank(arrays, strategy, records, staging, config) -> tuple[list[int], list[float]]:
    """Highest task id first (priority = task id)."""
    ids = np.asarray(arrays["embeddings"])[:, 0]
    order = [int(i) for i in np.argsort(-ids, kind="stable")]
    return order, [float(ids[i]) for i in order]


def toy_steps() -> rounds.RoundSteps:
    return rounds.RoundSteps(
        train=toy_train,
        extract=toy_extract,
        evaluate=lambda ds, dets: {"map": 0.5, "ap50": 0.75, "per_class_ap": {"RBC": 0.5}},
        save_model=toy_save,
        load_model=toy_load,
        lut_record=lambda staging, index, config: {"index": index, "value": 0.1 * index},
        rank=toy_rank,
    )


def toy_config(home: Path, **changes: Any) -> Config:
    values: dict[str, Any] = {
        "home": home,
        "min_labeled_for_magral": 1000,
        "fallback_strategy": "entropy_max",
        "prediction_threshold": 0.3,
        "budget": 2,
        "lut_records": 3,
    }
    values.update(changes)
    return Config.from_env({}, **values)


def studio_with(root: Path, labeled: Sequence[int], unlabeled: Sequence[int]) -> FakeStudio:
    studio = FakeStudio(root / "ls")
    for t in labeled:
        studio.add_task(t, [FakeAnnotation(100 + t, (box(10, 10, 50, 50, "RBC"),))])
    for t in unlabeled:
        studio.add_task(t)
    return studio


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Detectors train on the shared cores elsewhere: the real-detector round here uses one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tests ----------------------------------------------------------------------------------------------
def test_round_end_to_end_publishes_and_pushes_ranked_predictions(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=[4, 5, 6])
    studio.add_task(
        7, [FakeAnnotation(200, (box(1, 1, 5, 5, "RBC"),), was_cancelled=True)]
    )  # still unlabeled
    store = ModelStore(tmp_path / "store")
    stages: list[str] = []
    version = rounds.run_round(
        1,
        client=studio,
        store=store,
        config=toy_config(tmp_path),
        steps=toy_steps(),
        progress=lambda stage, fraction: stages.append(stage),
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
    assert "training" in stages and "pushing" in stages
    assert not list((store.project_dir(1) / "staging").iterdir())


def test_second_round_warm_starts_and_grows_the_class_list(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=[3])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path)
    first = rounds.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    studio.label_config = LABEL_CONFIG.replace(
        '<Label value="WBC"/>', '<Label value="Platelets"/><Label value="WBC"/>'
    )
    second = rounds.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    assert (first, second) == ("magral-1-v0001", "magral-1-v0002")
    assert store.list_versions(1) == [first, second] and store.current_version(1) == second
    assert store.load_metrics(1, second)["class_names"] == ["RBC", "WBC", "Platelets"]
    model = toy_load(store.version_dir(1, second) / rounds.DETECTOR_FILE)
    assert model["warm"] is True and model["class_names"] == ["RBC", "WBC", "Platelets"]


def test_failed_round_keeps_the_served_version_and_records_the_error(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1], unlabeled=[2])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path)
    first = rounds.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    studio.fail_import = True
    with pytest.raises(RuntimeError, match="import failed"):
        rounds.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    assert store.current_version(1) == first and store.list_versions(1) == [first]
    error = store.last_error(1)
    assert error is not None and "import failed" in error["message"]
    assert not list((store.project_dir(1) / "staging").iterdir())


def test_round_without_annotations_or_box_control_is_a_user_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    studio = studio_with(tmp_path, labeled=[], unlabeled=[1, 2])
    with pytest.raises(UserError, match="at least one annotated task"):
        rounds.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    studio = studio_with(tmp_path, labeled=[1], unlabeled=[2])
    studio.label_config = (
        '<View><Image name="i" value="$image"/>'
        '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    )
    with pytest.raises(UserError, match="RectangleLabels"):
        rounds.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    assert store.current_version(1) is None


def test_missing_images_are_skipped_and_counted(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=[3, 4])
    (studio.root / "img4.png").unlink()
    store = ModelStore(tmp_path / "store")
    version = rounds.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    assert [p["task"] for p in studio.imported] == [3]
    assert store.load_metrics(1, version)["skipped"]["image_errors"] == 1


def test_annotated_image_converts_percent_boxes_and_drops_unknown_labels(tmp_path: Path) -> None:
    config = parse_label_config(LABEL_CONFIG)
    result = [box(10, 20, 50, 25, "WBC"), box(0, 0, 10, 10, "Ghost"), box(90, 90, 20, 20, "RBC")]
    image, dropped = rounds.annotated_image(
        5, tmp_path / "x.png", (200, 100), result, config, ("RBC", "WBC"), "train", project=1
    )
    # (10 %, 20 %, 50 %, 25 %) of 200x100 → (20, 20, 120, 45); the last box is clipped to the image
    np.testing.assert_allclose(image.boxes_xyxy, [[20, 20, 120, 45], [180, 90, 200, 100]])
    assert image.labels.tolist() == [1, 0] and dropped == 1


def test_empty_annotation_is_a_labeled_image_without_boxes(tmp_path: Path) -> None:
    config = parse_label_config(LABEL_CONFIG)
    image, dropped = rounds.annotated_image(
        5, tmp_path / "x.png", (64, 48), [], config, ("RBC",), "train", project=1
    )
    assert image.num_boxes == 0 and dropped == 0


def test_map_is_measured_on_held_out_labeled_tasks_once_there_are_enough(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=range(1, 13), unlabeled=[20])
    store = ModelStore(tmp_path / "store")
    version = rounds.run_round(1, client=studio, store=store, config=toy_config(tmp_path), steps=toy_steps())
    metrics = store.load_metrics(1, version)
    held_out = [t for t in range(1, 13) if rounds.is_validation(1, t)]
    assert held_out and metrics["n_validation"] == len(held_out)
    assert metrics["map"] == 0.5 and metrics["ap50"] == 0.75
    model = toy_load(store.version_dir(1, version) / rounds.DETECTOR_FILE)
    assert model["n_train"] == 12 - len(held_out)  # validation tasks are not trained on


def test_json_safe_replaces_non_finite_numbers() -> None:
    metrics = {"map": float("nan"), "ap50": 0.5, "per_class_ap": {"RBC": float("inf"), "WBC": 0.25}}
    assert rounds.json_safe(metrics) == {"map": None, "ap50": 0.5, "per_class_ap": {"RBC": None, "WBC": 0.25}}


def test_validation_choice_is_stable_and_about_one_in_five() -> None:
    chosen = [rounds.is_validation(3, t) for t in range(1000)]
    assert 150 < sum(chosen) < 250
    assert chosen == [rounds.is_validation(3, t) for t in range(1000)]


def test_latest_annotation_ignores_cancelled_ones() -> None:
    old = FakeAnnotation(1, (), updated_at="2026-01-01T00:00:00Z")
    new = FakeAnnotation(2, (), updated_at="2026-02-01T00:00:00Z")
    skipped = FakeAnnotation(3, (), was_cancelled=True, updated_at="2026-03-01T00:00:00Z")
    assert rounds.latest_annotation(FakeTask(1, "x", (old, skipped, new))) is new
    assert rounds.latest_annotation(FakeTask(1, "x", (skipped,))) is None


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
    rounds.save_pool(tmp_path / "p.npz", dets, np.eye(2, dtype=np.float32), np.zeros((0, 2), np.float32))
    back = rounds.load_pool(tmp_path / "p.npz")
    assert [len(d) for d in back["detections"]] == [1, 0]
    np.testing.assert_allclose(back["detections"][0].class_probs, [[0.1, 0.2, 0.7]])
    assert back["embeddings"].shape == (2, 2) and back["labeled_embeddings"].shape == (0, 2)


def test_round_with_the_real_detector_at_toy_size(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2, 3], unlabeled=[4, 5])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, image_size=64, epochs=1, batch_size=2, prediction_threshold=0.0)
    version = rounds.run_round(1, client=studio, store=store, config=config, steps=rounds.default_steps())
    assert store.current_version(1) == version
    assert sorted(p["task"] for p in studio.imported) == [4, 5]
    assert sorted(p["score"] for p in studio.imported) == [0.0, 1.0]
    model = rounds.load_model_step(store.version_dir(1, version) / rounds.DETECTOR_FILE)
    assert rounds.warm_start(model, model) == len(model.state_dict())


def test_magral_round_reuses_the_fanned_out_records_and_keeps_policy_and_table(tmp_path: Path) -> None:
    calls: list[tuple[tuple[int, ...], int]] = []

    def toy_proxy(staging: Path, config: Config):
        def proxy(indices: np.ndarray, seed: int) -> float:
            calls.append((tuple(int(i) for i in indices), seed))
            return float(np.mean(indices)) / 10.0  # higher pool positions are "worth" more

        return proxy

    steps = toy_steps()
    steps = rounds.RoundSteps(
        steps.train,
        steps.extract,
        steps.evaluate,
        steps.save_model,
        steps.load_model,
        lut_record=functools.partial(rounds.lut_record_step, proxy_factory=toy_proxy),
        rank=functools.partial(rounds.rank_step, proxy_factory=toy_proxy),
    )
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=range(3, 11))
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, min_labeled_for_magral=2, budget=2, lut_records=6, policy_episodes=4)
    specs = rounds.magral_record_specs(8, config)
    assert len(specs) == 3  # half of the records are random (fanned out), half near the policy
    version = rounds.run_round(1, client=studio, store=store, config=config, steps=steps)
    metrics = store.load_metrics(1, version)
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 3
    assert calls[:3] == [(spec.indices, spec.seed) for spec in specs]  # the record "jobs"
    assert len(calls) == 6  # the fit computed only the 3 near-policy records itself
    directory = store.version_dir(1, version)
    assert (directory / rounds.POLICY_FILE).is_file() and (directory / rounds.LOOKUP_TABLE_FILE).is_file()
    assert sorted(store.load_ranking(1, version).task_ids) == list(range(3, 11))


def test_magral_falls_back_when_the_pool_fits_in_one_batch(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=[1, 2], unlabeled=[3, 4])
    store = ModelStore(tmp_path / "store")
    config = toy_config(tmp_path, min_labeled_for_magral=2, budget=5)
    version = rounds.run_round(1, client=studio, store=store, config=config, steps=toy_steps())
    assert store.load_metrics(1, version)["strategy"] == "entropy_max"


def test_warm_start_keeps_everything_but_the_class_dependent_head(tmp_path: Path) -> None:
    import torch

    from magral_core.detectors import build_detector

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
    copied = rounds.warm_start(grown, previous)
    after, before = grown.state_dict(), previous.state_dict()
    changed_shape = [k for k in after if before[k].shape != after[k].shape]
    assert changed_shape and copied == len(after) - len(changed_shape)
    for key in changed_shape:  # the new head keeps its fresh initialisation
        assert torch.equal(after[key], fresh[key])
    same = next(k for k in after if k not in changed_shape and after[k].is_floating_point())
    assert torch.equal(after[same], before[same])


def test_magral_round_with_the_real_detector_and_proxy_at_toy_size(tmp_path: Path) -> None:
    studio = studio_with(tmp_path, labeled=range(1, 13), unlabeled=range(20, 25))
    store = ModelStore(tmp_path / "store")
    config = toy_config(
        tmp_path,
        image_size=64,
        epochs=1,
        batch_size=4,
        min_labeled_for_magral=12,
        budget=2,
        lut_records=2,
        policy_episodes=2,
    )
    version = rounds.run_round(1, client=studio, store=store, config=config, steps=rounds.default_steps())
    metrics = store.load_metrics(1, version)
    assert metrics["strategy"] == "magral" and metrics["lut_records"] == 1 and metrics["n_validation"] > 0
    directory = store.version_dir(1, version)
    table = json.loads((directory / rounds.LOOKUP_TABLE_FILE).read_text())
    assert len(table["records"]) == 2 and all(0.0 <= r["value"] <= 1.0 for r in table["records"])
    assert sorted(store.load_ranking(1, version).task_ids) == list(range(20, 25))
