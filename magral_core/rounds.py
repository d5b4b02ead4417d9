"""One active-learning round of a Label Studio project, as three stages over a staging directory.

1. `prepare`: fetch every task and annotation through the client (a webhook is only a trigger), build a
   `DetectionDataset` of the annotated tasks, train the detector warm-started from the served version,
   evaluate it on the labeled validation tasks, run it once over the unlabeled pool (detections +
   embeddings) and write all of that into the staging directory.
2. `lut_record(i)`: one look-up-table record for MAGRAL (independent of the others, so they run in parallel
   as separate jobs); skipped while MAGRAL is not used.
3. `finish`: rank the pool with the round's strategy, push a prediction (boxes + score, best task lowest)
   for every unlabeled task under the new model version, switch Label Studio to serve in that order, write
   the ranking and metrics and publish the version in the store.

Every model-dependent operation is a field of `RoundSteps`, so tests run the pipeline at toy size with fakes
and `default_steps` binds the real detector, evaluation and strategies. `run_round` runs all three stages in
one process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from magral_core import boxes, ranking
from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.label_config import (
    LabelConfig,
    log_unknown,
    merge_class_names,
    parse_label_config,
    select_rectangles,
)
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
    - `lut_record(staging, index, config) -> JSON-able record` (MAGRAL only);
    - `rank(pool_arrays, strategy, records, staging, config) -> (order best first, priorities)`.
    """

    train: Callable[[DetectionDataset, Path | None, Config, Progress], Any]
    extract: Callable[[Any, DetectionDataset, Config], tuple[list[Detections], np.ndarray]]
    evaluate: Callable[[DetectionDataset, list[Detections]], Mapping[str, Any]]
    save_model: Callable[[Any, Path, Mapping[str, Any]], None]
    load_model: Callable[[Path], Any]
    lut_record: Callable[[Path, int, Config], Mapping[str, Any]]
    rank: Callable[
        [Mapping[str, Any], str, Sequence[Mapping[str, Any]], Path, Config], tuple[list[int], list[float]]
    ]


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
    plan = RoundPlan(
        project,
        version,
        class_names,
        asdict(label_config),
        strategy,
        len(magral_record_specs(len(pool), config)) if strategy == "magral" else 0,
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
    arrays = load_pool(staging / POOL_FILE)
    records = load_lut_records(staging)
    progress("ranking", 0.0)
    n = len(plan.pool)
    order, priorities = steps.rank(arrays, plan.strategy, records, staging, config) if n else ([], [])
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
    write_json(staging / METRICS, metrics)
    progress("pushing", 0.0)
    if predictions:
        client.import_predictions(plan.project, predictions)
    client.serve_in_ranked_order(plan.project, plan.version)
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


# --- the real steps ---
def default_steps() -> RoundSteps:
    """Steps bound to the project's detector, evaluation and strategies (imported when called)."""
    return RoundSteps(
        train=train_detector_step,
        extract=extract_step,
        evaluate=evaluate_step,
        save_model=save_model_step,
        load_model=load_model_step,
        lut_record=lut_record_step,
        rank=rank_step,
    )


def train_detector_step(
    dataset: DetectionDataset, previous_dir: Path | None, config: Config, progress: Progress
) -> Any:
    """Build the configured detector, warm-start it from the previous version, train it on `dataset`."""
    from magral_core.detectors import build_detector
    from magral_core.engine import train_detector

    model = build_detector(
        config.detector,
        num_classes=dataset.num_classes,
        image_size=config.image_size,
        weights_dir=config.weights_dir,
        pretrained=True,
        seed=config.seed,
    )
    if previous_dir is not None and (previous_dir / DETECTOR_FILE).is_file():
        warm_start(model, load_model_step(previous_dir / DETECTOR_FILE))
    progress("training", 0.0)
    train_detector(
        model,
        dataset,
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
        device=config.device,
        on_epoch=lambda epoch, _loss: progress("training", epoch / config.epochs),
    )
    return model.to("cpu")


def warm_start(model: Any, previous: Any) -> int:
    """Copy every parameter of `previous` whose name and shape match into `model`; returns how many.

    Class-dependent head layers change shape when labels were added, so they keep their fresh
    initialisation while everything else continues from the previous round.
    """
    import torch

    target = model.state_dict()
    source = {k: v for k, v in previous.state_dict().items() if k in target and v.shape == target[k].shape}
    with torch.no_grad():
        model.load_state_dict(source, strict=False)
    log.info("warm start: %d of %d tensors taken from the previous version", len(source), len(target))
    return len(source)


def extract_step(
    model: Any, dataset: DetectionDataset, config: Config
) -> tuple[list[Detections], np.ndarray]:
    from magral_core.engine import extract

    return extract(model, dataset, batch_size=config.batch_size, score_threshold=config.score_threshold)


def evaluate_step(dataset: DetectionDataset, detections: list[Detections]) -> Mapping[str, Any]:
    from magral_core.evaluation import evaluate_coco

    return evaluate_coco(dataset, detections).as_dict()


def save_model_step(model: Any, path: Path, meta: Mapping[str, Any]) -> None:
    from magral_core.checkpoint import save_checkpoint

    save_checkpoint(path, model, meta=dict(meta))


def load_model_step(path: Path) -> Any:
    from magral_core.checkpoint import load_checkpoint

    model, _meta = load_checkpoint(path)
    return model


def magral_settings(config: Config) -> Any:
    """MAGRAL's fitting settings from the config (records, neighbours, policy updates, seed)."""
    from magral_core.policy_training import TrainingSettings
    from magral_core.strategies import MagralSettings

    return MagralSettings(
        records=config.lut_records,
        neighbours=config.lut_neighbours,
        training=TrainingSettings(updates=config.policy_episodes, seed=config.seed),
    )


def magral_record_specs(pool_size: int, config: Config) -> list[Any]:
    """The look-up-table records that can be computed before any policy exists: the uniformly random batches
    `strategies.fit_magral` draws first (same generator, same order), so each can be a separate job. The
    near-policy records depend on the policy trained on these and are computed by the fan-in job."""
    from magral_core.lookup_table import random_batches, specs

    settings = magral_settings(config)
    budget = min(config.budget, pool_size)
    n_random = max(1, settings.records - round(settings.records * settings.policy_fraction))
    rng = np.random.default_rng(config.seed)
    return specs(random_batches(pool_size, budget, n_random, rng), "random", seed=config.seed)


def build_proxy(staging: Path, config: Config) -> Callable[[np.ndarray, int], float]:
    """`proxy(batch, seed) -> mAP` of the round in `staging`: the semi-supervised proxy (see
    `magral_core.proxy`) on the round's detector, its labeled training images plus the pool images at
    `batch` (unlabeled), evaluated on the labeled validation images."""
    from magral_core.proxy import proxy_for

    images = load_images(staging / IMAGES_FILE)
    train, pool, val = images["train"], images["pool"], images.get("val")
    if val is None or train is None or pool is None:
        raise UserError(
            f"MAGRAL needs labeled validation images (at least {MIN_LABELED_FOR_VALIDATION} labeled tasks); "
            "found none"
        )
    model = load_model_step(staging / DETECTOR_FILE)  # the proxy runs on the CPU
    return proxy_for(model, train, pool, val)


ProxyFactory = Callable[[Path, Config], Callable[[np.ndarray, int], float]]


def lut_record_step(
    staging: Path, index: int, config: Config, *, proxy_factory: ProxyFactory | None = None
) -> Mapping[str, Any]:
    """Record `index` of `magral_record_specs`: the proxy's mAP with that random batch."""
    from magral_core.lookup_table import compute_record

    n = len(load_pool(staging / POOL_FILE)["detections"])
    spec = magral_record_specs(n, config)[index]
    record = compute_record(spec, (proxy_factory or build_proxy)(staging, config))
    return {
        "indices": record.indices.tolist(),
        "value": record.value,
        "source": record.source,
        "seed": spec.seed,
    }


def fit_magral_step(
    pool: Any,
    records: Sequence[Mapping[str, Any]],
    staging: Path,
    config: Config,
    *,
    proxy_factory: ProxyFactory | None = None,
) -> Any:
    """Fit MAGRAL's controller for this pool; records computed by the record jobs are reused, the rest
    (near-policy records) are computed here. Writes the policy and the look-up table into `staging`."""
    import torch

    from magral_core.lookup_table import save_records
    from magral_core.policy import save_state
    from magral_core.strategies import fit_magral

    known = {(tuple(int(i) for i in r["indices"]), int(r["seed"])): float(r["value"]) for r in records}
    proxy: list[Callable[[np.ndarray, int], float]] = []

    def evaluate(indices: np.ndarray, seed: int) -> float:
        key = (tuple(sorted(int(i) for i in indices)), int(seed))
        if key in known:
            return known[key]
        if not proxy:
            proxy.append((proxy_factory or build_proxy)(staging, config))
        return proxy[0](indices, seed)

    budget = min(config.budget, len(pool))
    strategy, report = fit_magral(pool.features, budget, evaluate, magral_settings(config), seed=config.seed)
    torch.save(save_state(strategy.controller), staging / POLICY_FILE)
    save_records(staging / LOOKUP_TABLE_FILE, len(pool), report.records)
    log.info(
        "magral fitted records=%d reused=%d estimators=%s",
        len(report.records),
        len(known),
        ",".join(report.estimator),
    )
    return strategy


def rank_step(
    arrays: Mapping[str, Any],
    strategy: str,
    records: Sequence[Mapping[str, Any]],
    staging: Path,
    config: Config,
    *,
    proxy_factory: ProxyFactory | None = None,
) -> tuple[list[int], list[float]]:
    """Rank the whole pool with a registered strategy (MAGRAL: fitted here first); returns pool positions
    best first and their priorities."""
    from magral_core.strategies import make_strategy
    from magral_core.strategies.base import Pool

    pool = Pool(arrays["embeddings"], tuple(arrays["detections"]), arrays["labeled_embeddings"])
    if strategy == "magral":
        chosen = fit_magral_step(pool, records, staging, config, proxy_factory=proxy_factory)
    else:
        chosen = make_strategy(strategy)
    picks = chosen.rank(pool, min(config.budget, len(pool)), np.random.default_rng(config.seed))
    return [p.index for p in picks], [p.priority for p in picks]
