"""One active-learning round of a Label Studio project, as three stages over a staging directory.

1. `prepare`: fetch every task and annotation through the client (a webhook is only a trigger), build a
   `DetectionDataset` of the annotated tasks, train the detector warm-started from the served version,
   evaluate it on the labeled validation tasks, run it once over the unlabeled pool (detections +
   embeddings) and write all of that into the staging directory.
2. `lut_record(i)`: one look-up-table record for MAGRAL (independent of the others, so they run in parallel
   as separate jobs); skipped while MAGRAL is not used. Then `propose`: MAGRAL's first policy stage on
   those records asks for records near its policy, computed by `lut_record` in parallel in the same way.
3. `finish`: rank the pool with the round's strategy, push a prediction (boxes + score, best task lowest)
   for every unlabeled task under the new model version, switch Label Studio to serve in that order, write
   the ranking and metrics and publish the version in the store.

Every model-dependent operation is a field of `RoundSteps`, so tests run the pipeline at toy size with fakes
and `round_steps.default_steps` binds the real detector, evaluation and strategies. `run_round` runs all
three stages in one process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from magral_core import boxes, features, ranking
from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.label_config import (
    LabelConfig,
    log_unknown,
    merge_class_names,
    parse_label_config,
    select_rectangles,
)
from magral_core.stage_clock import StageClock, merge_seconds
from magral_core.store import METRICS, RANKING, ModelStore, read_json, write_json
from magral_core.structures import AnnotatedImage, DetectionDataset, Detections

log = logging.getLogger(__name__)

VALIDATION_MODULUS = 5  # one labeled task in five (by a stable hash of its id) is held out for mAP
MIN_LABELED_FOR_VALIDATION = 10
ROUND_FILE = "round.json"
POOL_FILE = "pool.npz"
DETECTOR_FILE = "detector.pt"
PREDICTIONS_FILE = "predictions.json"
IMAGES_FILE = "images.json"
POLICY_FILE = "policy.pt"
LOOKUP_TABLE_FILE = "lookup_table.json"
PROXY_CACHE_FILE = "proxy_cache.pt"  # MAGRAL proxy frozen features, shared by the record jobs; unpublished
MAGRAL_FIT_FILE = "magral_fit.pt"  # MAGRAL between its two stages of records; unpublished

Progress = Callable[[str, float], None]


class StudioClient(Protocol):
    """The Label Studio calls a round makes (see `magral_core.labelstudio.LabelStudioClient`)."""

    def get_project(self, project_id: int) -> Mapping[str, Any]: ...
    def list_tasks(self, project_id: int, *, image_key: str | None = None) -> Sequence[Any]: ...
    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int: ...
    def serve_in_ranked_order(self, project_id: int, model_version: str) -> None: ...
    def fetch_image(self, image: str, *, task_id: int) -> Path: ...


@dataclass(frozen=True)
class RoundSteps:
    """The model-dependent operations of a round.

    - `train(dataset, previous_dir, config, progress) -> model`: a detector for `dataset.class_names`,
      warm-started from the detector in `previous_dir` (a published version) when given;
    - `extract(model, dataset, config) -> (detections, embeddings (N, D))`;
    - `evaluate(dataset, detections) -> {"map", "ap50", "per_class_ap"}`;
    - `save_model(model, path, meta)` / `load_model(path) -> model`;
    - `count_lut_records(pool_size, config) -> int`: record jobs a MAGRAL round fans out;
    - `lut_record(staging, index, config) -> JSON-able record` (MAGRAL only);
    - `rank(pool_arrays, strategy, records, staging, config) -> (order best first, priorities)`;
    - `prepare_proxy(staging, config)` (optional, MAGRAL only): compute what every record job shares (the
      proxy's frozen features, `PROXY_CACHE_FILE`) once, at the end of `prepare`;
    - `propose_records(staging, records, config) -> int` (optional, MAGRAL only): the policy's first stage
      on the first `count_lut_records` records; returns how many more records (indices from there on) it
      asks for, computed by `lut_record` like the first ones.
    """

    train: Callable[[DetectionDataset, Path | None, Config, Progress], Any]
    extract: Callable[[Any, DetectionDataset, Config], tuple[list[Detections], np.ndarray]]
    evaluate: Callable[[DetectionDataset, list[Detections]], Mapping[str, Any]]
    save_model: Callable[[Any, Path, Mapping[str, Any]], None]
    load_model: Callable[[Path], Any]
    count_lut_records: Callable[[int, Config], int]
    lut_record: Callable[[Path, int, Config], Mapping[str, Any]]
    rank: Callable[
        [Mapping[str, Any], str, Sequence[Mapping[str, Any]], Path, Config], tuple[list[int], list[float]]
    ]
    prepare_proxy: Callable[[Path, Config], None] | None = None
    propose_records: Callable[[Path, Sequence[Mapping[str, Any]], Config], int] | None = None


@dataclass(frozen=True)
class TaskImage:
    """An unlabeled task of the pool: its id and the original size of its image."""

    task: int
    width: int
    height: int


@dataclass(frozen=True)
class RoundPlan:
    """What `prepare` decided, saved as `round.json` in the staging directory."""

    project: int
    version: str
    class_names: tuple[str, ...]
    label_config: dict[str, Any]
    strategy: str
    lut_records: int
    labeled_tasks: tuple[int, ...]
    validation_tasks: tuple[int, ...]
    pool: tuple[TaskImage, ...]
    skipped: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def save(self, staging: Path) -> None:
        write_json(staging / ROUND_FILE, asdict(self))

    @staticmethod
    def load(staging: Path) -> RoundPlan:
        data = read_json(staging / ROUND_FILE)
        data["class_names"] = tuple(data["class_names"])
        data["labeled_tasks"] = tuple(data["labeled_tasks"])
        data["validation_tasks"] = tuple(data["validation_tasks"])
        data["pool"] = tuple(TaskImage(**p) for p in data["pool"])
        return RoundPlan(**data)

    @property
    def config(self) -> LabelConfig:
        c = self.label_config
        return LabelConfig(c["from_name"], c["to_name"], c["image_key"], tuple(c["labels"]))


# --- tasks → dataset (pure but for the image files) ---
def latest_annotation(task: Any) -> Any | None:
    """The most recently updated non-cancelled annotation of a task, or None (an unlabeled task)."""
    kept = [a for a in getattr(task, "annotations", ()) if not a.was_cancelled]
    return max(kept, key=lambda a: (str(a.updated_at), a.id)) if kept else None


def is_validation(project: int, task: int) -> bool:
    """A stable choice (it never changes as the labeled set grows), so mAP is comparable across rounds."""
    digest = hashlib.sha1(f"{project}:{task}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % VALIDATION_MODULUS == 0


def annotated_image(
    task_id: int,
    path: Path,
    size: tuple[int, int],
    result: Sequence[Mapping[str, Any]],
    config: LabelConfig,
    class_names: Sequence[str],
    split: str,
    *,
    project: int,
) -> tuple[AnnotatedImage, int]:
    """An `AnnotatedImage` from an annotation's LS result; returns it and the number of boxes dropped."""
    width, height = size
    rects = select_rectangles(result, config, class_names)
    log_unknown(rects.unknown, project=project, task=task_id)
    if rects.values:
        percent = np.array(
            [[v.get("x", 0), v.get("y", 0), v.get("width", 0), v.get("height", 0)] for v in rects.values],
            np.float64,
        )  # (N, 4)
        rotation = np.array([float(v.get("rotation", 0) or 0) for v in rects.values])
        xyxy = boxes.labelstudio_percent_to_xyxy(percent, width, height, rotation)
    else:
        xyxy = np.zeros((0, 4))
    clip = boxes.clip_boxes_xyxy(xyxy, width, height)
    labels = np.asarray(rects.labels, np.int64)[clip.keep]
    image = AnnotatedImage(
        task_id, str(path), width, height, clip.boxes[clip.keep].astype(np.float32), labels, split=split
    )
    dropped = sum(rects.unknown.values()) + clip.num_empty + clip.num_outside
    return image, dropped


def json_safe(value: Any) -> Any:
    """NaN/inf (e.g. the AP of a class absent from the validation images) → None, recursively, so metrics
    are valid JSON for `/status`."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def choose_strategy(n_labeled: int, config: Config) -> str:
    """MAGRAL once `min_labeled_for_magral` labeled images exist, else the fallback strategy."""
    return "magral" if n_labeled >= config.min_labeled_for_magral else config.fallback_strategy


# --- stage 1 ---
def prepare(
    project: int,
    version: str,
    staging: Path,
    *,
    client: StudioClient,
    store: ModelStore,
    config: Config,
    steps: RoundSteps,
    progress: Progress,
) -> RoundPlan:
    """Fetch, train, evaluate, extract; write the plan, detector and pool arrays into `staging`.

    Raises UserError when the project's label config has no box control or no task is annotated.
    """
    from magral_core.images import image_size

    progress = clock = StageClock(progress)  # per-stage seconds for the round's metrics
    progress("fetching", 0.0)
    details = client.get_project(project)
    config_xml = str(details.get("label_config", ""))
    label_config = parse_label_config(config_xml)
    previous = store.current_version(project)
    previous_names: tuple[str, ...] = ()
    if previous:
        previous_names = tuple(store.load_metrics(project, previous).get("class_names", ()))
    class_names = merge_class_names(previous_names, label_config.labels)
    tasks = list(client.list_tasks(project, image_key=label_config.image_key))
    skipped = {"image_errors": 0, "dropped_boxes": 0}
    labeled: list[AnnotatedImage] = []
    pool_images: list[AnnotatedImage] = []
    pool: list[TaskImage] = []
    for done, task in enumerate(tasks):
        progress("fetching", done / max(1, len(tasks)))
        try:
            path = client.fetch_image(str(task.image), task_id=int(task.id))
            size = image_size(path)
        except UserError as exc:
            skipped["image_errors"] += 1
            log.warning("project=%s task=%s skipped: %s", project, task.id, exc)
            continue
        annotation = latest_annotation(task)
        if annotation is None:
            pool.append(TaskImage(int(task.id), *size))
            pool_images.append(AnnotatedImage(int(task.id), str(path), size[0], size[1], split="pool"))
            continue
        split = "val" if is_validation(project, int(task.id)) else "train"
        image, dropped = annotated_image(
            int(task.id), path, size, annotation.result, label_config, class_names, split, project=project
        )
        skipped["dropped_boxes"] += dropped
        labeled.append(image)
    if not labeled:
        raise UserError(
            f"project {project}: expected at least one annotated task to train on, found none "
            f"among {len(tasks)} tasks"
        )
    dataset = DetectionDataset(Path("/"), class_names, tuple(labeled))
    use_val = len(labeled) >= MIN_LABELED_FOR_VALIDATION and any(i.split == "val" for i in labeled)
    train_set = dataset.split("train") if use_val and any(i.split == "train" for i in labeled) else dataset
    strategy = choose_strategy(len(labeled), config)
    log.info(
        "project=%s version=%s n_labeled=%d n_unlabeled=%d strategy=%s",
        project,
        version,
        len(labeled),
        len(pool),
        strategy,
    )

    previous_dir = store.version_dir(project, previous) if previous else None
    model = steps.train(train_set, previous_dir, config, progress)
    metrics: dict[str, Any] = {"map": None, "ap50": None, "per_class_ap": {}}
    if use_val:
        progress("evaluating", 0.0)
        val = dataset.split("val")
        metrics = json_safe(dict(steps.evaluate(val, steps.extract(model, val, config)[0])))
    progress("scoring", 0.0)
    pool_set = DetectionDataset(Path("/"), class_names, tuple(pool_images))
    detections, embeddings = steps.extract(model, pool_set, config) if pool_images else ([], np.zeros((0, 0)))
    _, labeled_embeddings = steps.extract(model, train_set, config)
    steps.save_model(
        model,
        staging / DETECTOR_FILE,
        {"version": version, "class_names": list(class_names), "project": project, "metrics": metrics},
    )
    save_pool(staging / POOL_FILE, detections, np.asarray(embeddings), np.asarray(labeled_embeddings))
    save_images(
        staging / IMAGES_FILE,
        {"train": train_set, "val": dataset.split("val") if use_val else None, "pool": pool_set},
    )
    if strategy == "magral" and len(pool) <= config.budget:
        strategy = config.fallback_strategy  # the whole pool is the batch: nothing to learn a choice for
    if strategy == "magral" and steps.prepare_proxy is not None:
        progress("caching", 0.0)
        steps.prepare_proxy(staging, config)  # once here, so the record jobs only load it
    metrics.update(stage_seconds=clock.seconds(), started_at=clock.started, prepared_at=time.time())
    plan = RoundPlan(
        project,
        version,
        class_names,
        asdict(label_config),
        strategy,
        steps.count_lut_records(len(pool), config) if strategy == "magral" else 0,
        tuple(i.image_id for i in labeled),
        tuple(i.image_id for i in labeled if use_val and i.split == "val"),
        tuple(pool),
        skipped,
        metrics,
    )
    plan.save(staging)
    return plan


# --- stage 2 ---
def lut_record(staging: Path, index: int, *, config: Config, steps: RoundSteps) -> Path:
    """Compute look-up-table record `index` and write it to `staging/lut/record-<index>.json`."""
    record = steps.lut_record(staging, index, config)
    path = staging / "lut" / f"record-{index:04d}.json"
    write_json(path, dict(record))
    return path


def load_lut_records(staging: Path) -> list[dict[str, Any]]:
    """The records written so far, in index order (a failed record job leaves a gap, not an error)."""
    folder = staging / "lut"
    return [read_json(p) for p in sorted(folder.glob("record-*.json"))] if folder.is_dir() else []


def propose(staging: Path, *, config: Config, steps: RoundSteps) -> range:
    """After the first records: MAGRAL's first stage (`RoundSteps.propose_records`); returns the indices of
    the records it asks for next (empty when the round has no records or the steps no such stage)."""
    plan = RoundPlan.load(staging)
    if not plan.lut_records or steps.propose_records is None:
        return range(0)
    more = steps.propose_records(staging, load_lut_records(staging), config)
    return range(plan.lut_records, plan.lut_records + more)


# --- stage 3 ---
def finish(
    staging: Path,
    *,
    client: StudioClient,
    store: ModelStore,
    config: Config,
    steps: RoundSteps,
    progress: Progress,
) -> str:
    """Rank, push predictions, serve in ranked order, publish. Returns the published version."""
    plan = RoundPlan.load(staging)
    progress = clock = StageClock(progress)
    # between the two processes: the record jobs and the policy (MAGRAL), else the wait in the queue
    prepared_at = float(plan.metrics.get("prepared_at", clock.started))
    between = {"lookup_table" if plan.lut_records else "queued": clock.started - prepared_at}
    arrays = load_pool(staging / POOL_FILE)
    records = load_lut_records(staging)
    progress("ranking", 0.0)
    n = len(plan.pool)
    order, priorities = steps.rank(arrays, plan.strategy, records, staging, config) if n else ([], [])
    for done_with in (PROXY_CACHE_FILE, MAGRAL_FIT_FILE):  # of no use once ranked (the cache is large)
        (staging / done_with).unlink(missing_ok=True)
    scores = ranking.scores_from_order(order, n)
    predictions = []
    for i, task in enumerate(plan.pool):
        result = ranking.detections_to_results(
            arrays["detections"][i],
            width=task.width,
            height=task.height,
            class_names=plan.class_names,
            config=plan.config,
            threshold=config.prediction_threshold,
        )
        predictions.append(ranking.task_prediction(task.task, result, float(scores[i]), plan.version))
    write_json(staging / PREDICTIONS_FILE, {str(p["task"]): p for p in predictions})
    write_json(
        staging / RANKING,
        {
            "version": plan.version,
            "strategy": plan.strategy,
            "task_ids": [plan.pool[i].task for i in order],
            "scores": [float(scores[i]) for i in order],
            "priorities": [float(p) for p in priorities],
            "prediction_threshold": config.prediction_threshold,
            **task_signals([arrays["detections"][i] for i in order], config.prediction_threshold),
        },
    )
    metrics = dict(
        plan.metrics,
        version=plan.version,
        strategy=plan.strategy,
        class_names=list(plan.class_names),
        n_labeled=len(plan.labeled_tasks),
        n_validation=len(plan.validation_tasks),
        n_unlabeled=n,
        lut_records=len(records),
        skipped=plan.skipped,
    )
    progress("pushing", 0.0)
    if predictions:
        client.import_predictions(plan.project, predictions)
    client.serve_in_ranked_order(plan.project, plan.version)
    metrics["stage_seconds"] = merge_seconds(plan.metrics.get("stage_seconds", {}), between, clock.seconds())
    metrics["duration_s"] = round(time.time() - float(plan.metrics.get("started_at", clock.started)), 3)
    write_json(staging / METRICS, metrics)
    store.publish(plan.project, staging, plan.version)
    log.info(
        "project=%s version=%s published map=%s n_labeled=%d n_predictions=%d",
        plan.project,
        plan.version,
        metrics.get("map"),
        len(plan.labeled_tasks),
        len(predictions),
    )
    return plan.version


def task_signals(detections: Sequence[Detections], threshold: float) -> dict[str, list[Any]]:
    """What the ranking shows per task (same order as `detections`): `boxes` shown to annotators (score >=
    `threshold`), `best_scores` (highest box score, None without a detection) and `uncertainties` (the
    largest class entropy in nats among the top detections, `features.detection_stats`)."""
    return {
        "boxes": [int((np.asarray(d.scores) >= threshold).sum()) for d in detections],
        "best_scores": [round(float(np.max(d.scores)), 4) if len(d) else None for d in detections],
        "uncertainties": [round(float(features.detection_stats(d)[1]), 4) for d in detections],
    }


def run_round(
    project: int,
    *,
    client: StudioClient,
    store: ModelStore,
    config: Config,
    steps: RoundSteps,
    progress: Progress | None = None,
) -> str:
    """All three stages in this process (tests, a single worker); a failure discards the staging directory,
    records the error in the store and re-raises."""
    report = progress or (lambda stage, fraction: None)
    version = store.reserve_version(project)
    staging = store.begin(project, version)
    try:
        plan = prepare(
            project, version, staging, client=client, store=store, config=config, steps=steps, progress=report
        )
        for index in range(plan.lut_records):
            report("lookup_table", index / plan.lut_records)
            lut_record(staging, index, config=config, steps=steps)
        for index in propose(staging, config=config, steps=steps):
            lut_record(staging, index, config=config, steps=steps)
        return finish(staging, client=client, store=store, config=config, steps=steps, progress=report)
    except Exception as exc:
        store.discard(staging)
        store.record_error(project, f"{type(exc).__name__}: {exc}", stage="round")
        raise


# --- pool arrays on disk ---
def save_pool(
    path: Path, detections: Sequence[Detections], embeddings: np.ndarray, labeled_embeddings: np.ndarray
) -> None:
    """Detections of the pool (concatenated, with per-image offsets) and embeddings, in one .npz."""
    counts = np.array([len(d) for d in detections], np.int64)
    probs = [d.class_probs for d in detections]
    has_probs = bool(detections) and all(p is not None for p in probs)
    with open(path, "wb") as handle:
        np.savez(
            handle,
            counts=counts,
            boxes=np.concatenate([d.boxes_xyxy for d in detections]) if detections else np.zeros((0, 4)),
            scores=np.concatenate([d.scores for d in detections]) if detections else np.zeros(0),
            labels=np.concatenate([d.labels for d in detections]) if detections else np.zeros(0, np.int64),
            class_probs=np.concatenate(probs) if has_probs else np.zeros((0, 0)),  # type: ignore[arg-type]
            has_probs=np.array(has_probs),
            embeddings=embeddings,
            labeled_embeddings=labeled_embeddings,
        )


def load_pool(path: Path) -> dict[str, Any]:
    """{"detections": list[Detections], "embeddings": (N, D), "labeled_embeddings": (L, D)}."""
    with np.load(path) as data:
        offsets = np.concatenate([[0], np.cumsum(data["counts"])])
        has_probs = bool(data["has_probs"])
        detections = [
            Detections(
                data["boxes"][a:b].astype(np.float32),
                data["scores"][a:b].astype(np.float32),
                data["labels"][a:b].astype(np.int64),
                data["class_probs"][a:b].astype(np.float32) if has_probs else None,
            )
            for a, b in itertools.pairwise(offsets)
        ]
        return {
            "detections": detections,
            "embeddings": data["embeddings"],
            "labeled_embeddings": data["labeled_embeddings"],
        }


def save_images(path: Path, datasets: Mapping[str, DetectionDataset | None]) -> None:
    """The round's image sets (files, sizes, boxes, labels) as JSON, for jobs that rebuild them."""
    out: dict[str, Any] = {}
    for name, dataset in datasets.items():
        out[name] = (
            None
            if dataset is None
            else {
                "class_names": list(dataset.class_names),
                "images": [
                    {
                        "image_id": im.image_id,
                        "file_name": str(dataset.path(im)),
                        "width": im.width,
                        "height": im.height,
                        "boxes_xyxy": im.boxes_xyxy.tolist(),
                        "labels": im.labels.tolist(),
                        "split": im.split,
                    }
                    for im in dataset.images
                ],
            }
        )
    write_json(path, out)


def load_images(path: Path) -> dict[str, DetectionDataset | None]:
    """The image sets `save_images` wrote."""
    out: dict[str, DetectionDataset | None] = {}
    for name, data in read_json(path).items():
        out[name] = (
            None
            if data is None
            else DetectionDataset(
                Path("/"), tuple(data["class_names"]), tuple(AnnotatedImage(**im) for im in data["images"])
            )
        )
    return out


def load_predictions(version_dir: Path) -> dict[int, dict[str, Any]]:
    """The predictions a published version pushed, by task id (empty when the file is absent)."""
    path = version_dir / PREDICTIONS_FILE
    if not path.is_file():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
