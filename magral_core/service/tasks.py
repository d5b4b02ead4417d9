"""Label Studio tasks → the round's image sets: which tasks are labeled, which labeled ones validate, the
boxes of an annotation in the detector's convention, and the unlabeled pool.

Pure but for the image files the client fetches. A labeled task validates (is held out of the detector's
training, and measures mAP) by a stable hash of its id, so the choice never changes as the labeled set grows
and mAP stays comparable across rounds.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from magral_core import boxes
from magral_core.errors import UserError
from magral_core.method.candidates import CandidateRule, candidate_positions
from magral_core.service.staging import TaskImage
from magral_core.service.steps import Progress, StudioClient
from magral_core.structures import AnnotatedImage, DetectionDataset
from magral_core.studio.label_config import LabelConfig, log_unknown, select_rectangles

log = logging.getLogger(__name__)

VALIDATION_MODULUS = 5  # one labeled task in five (by a stable hash of its id) is held out for mAP
MIN_LABELED_FOR_VALIDATION = 10


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


def fetch_task_image(
    client: StudioClient, task_id: int, url: str, *, split: str | None = None
) -> AnnotatedImage:
    """The task's image fetched through the client, as an image without boxes; raises UserError (with the
    reason) when it cannot be had or is not an image."""
    from magral_core.datasets.images import image_size

    path = Path(client.fetch_image(url, task_id=task_id))
    width, height = image_size(path)
    return AnnotatedImage(task_id, str(path), width, height, split=split)


@dataclass(frozen=True)
class RoundImages:
    """The images of a round built from the project's tasks: labeled (split "train" or "val"), the unlabeled
    pool, and what was skipped (tasks whose image failed, boxes dropped)."""

    class_names: tuple[str, ...]
    labeled: tuple[AnnotatedImage, ...]
    pool: tuple[AnnotatedImage, ...]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def uses_validation(self) -> bool:
        """Whether enough labeled tasks exist to hold validation ones out (else all train, no mAP)."""
        return len(self.labeled) >= MIN_LABELED_FOR_VALIDATION and any(i.split == "val" for i in self.labeled)

    def dataset(self, split: str | None = None) -> DetectionDataset:
        images = self.labeled if split is None else tuple(i for i in self.labeled if i.split == split)
        return DetectionDataset(Path("/"), self.class_names, images)

    @property
    def train(self) -> DetectionDataset:
        """What the detector trains on: the labeled tasks less the validation ones (when used)."""
        if self.uses_validation and any(i.split == "train" for i in self.labeled):
            return self.dataset("train")
        return self.dataset()

    @property
    def val(self) -> DetectionDataset | None:
        return self.dataset("val") if self.uses_validation else None

    @property
    def pool_set(self) -> DetectionDataset:
        return DetectionDataset(Path("/"), self.class_names, self.pool)

    @property
    def pool_tasks(self) -> tuple[TaskImage, ...]:
        return tuple(TaskImage(i.image_id, i.width, i.height) for i in self.pool)


def candidate_tasks(
    tasks: Sequence[Any], previous_order: Sequence[int], budget: int, rule: CandidateRule,
    seed: int | Sequence[int],
) -> tuple[list[Any], dict[str, int]]:
    """The tasks a round fetches: every annotated one and, when `rule` applies to the unannotated ones, only
    their candidates (`method.candidates.candidate_positions` over the unannotated tasks in id order, the
    previous version's ranking `previous_order` (task ids, best first) as what it carries). Returns the
    tasks in their listed order and what was chosen: {"unlabeled", "candidates", "carried"}, empty when the
    whole pool is ranked."""
    unannotated = sorted(int(t.id) for t in tasks if latest_annotation(t) is None)
    if not rule.applies(len(unannotated)):
        return list(tasks), {}
    position = {task_id: p for p, task_id in enumerate(unannotated)}
    carried = [position[t] for t in previous_order if t in position]
    chosen = candidate_positions(len(unannotated), budget, rule, carried, seed)
    keep = {unannotated[p] for p in chosen.tolist()}
    summary = {"unlabeled": len(unannotated), "candidates": len(keep),
               "carried": len(keep & {unannotated[p] for p in carried[: rule.carry]})}
    return [t for t in tasks if latest_annotation(t) is not None or int(t.id) in keep], summary


def round_images(
    project: int,
    tasks: Sequence[Any],
    label_config: LabelConfig,
    class_names: tuple[str, ...],
    client: StudioClient,
    progress: Progress,
) -> RoundImages:
    """Fetch every task's image; annotated tasks become labeled images (their latest annotation), the others
    the pool. Raises UserError when no task is annotated."""
    skipped = {"image_errors": 0, "dropped_boxes": 0}
    labeled: list[AnnotatedImage] = []
    pool: list[AnnotatedImage] = []
    for done, task in enumerate(tasks):
        progress("fetching", done / max(1, len(tasks)))
        try:
            image = fetch_task_image(client, int(task.id), str(task.image), split="pool")
        except UserError as exc:
            skipped["image_errors"] += 1
            log.warning("project=%s task=%s skipped: %s", project, task.id, exc)
            continue
        annotation = latest_annotation(task)
        if annotation is None:
            pool.append(image)
            continue
        split = "val" if is_validation(project, int(task.id)) else "train"
        labeled_image, dropped = annotated_image(
            image.image_id, Path(image.file_name), (image.width, image.height), annotation.result,
            label_config, class_names, split, project=project,
        )
        skipped["dropped_boxes"] += dropped
        labeled.append(labeled_image)
    if not labeled:
        raise UserError(
            f"project {project}: expected at least one annotated task to train on, found none "
            f"among {len(tasks)} tasks"
        )
    return RoundImages(class_names, tuple(labeled), tuple(pool), skipped)
