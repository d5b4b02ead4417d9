"""Tasks → pre-annotations: fetch each task's image, run the detector once over those that could be had,
and turn its boxes into Label Studio result items. The one path used by `/predict` (tasks a version did not
score), the scoring of new tasks, and a round's predictions (`task_results` on the pool's detections).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.service.steps import RoundSteps, StudioClient
from magral_core.service.tasks import fetch_task_image
from magral_core.structures import AnnotatedImage, DetectionDataset, Detections
from magral_core.studio.label_config import LabelConfig
from magral_core.studio.results import detections_to_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskRef:
    """A task to pre-annotate: its id and its image URL (None when the task data has none)."""

    task: int
    url: str | None


def task_results(
    detections: Detections,
    width: int,
    height: int,
    *,
    class_names: Sequence[str],
    label_config: LabelConfig,
    config: Config,
) -> list[dict[str, Any]]:
    """The result items of one image's detections (boxes above the prediction threshold)."""
    return detections_to_results(
        detections,
        width=width,
        height=height,
        class_names=class_names,
        config=label_config,
        threshold=config.prediction_threshold,
    )


def predict_tasks(
    project: int,
    tasks: Sequence[TaskRef],
    *,
    client: StudioClient,
    model: Callable[[], Any],
    steps: RoundSteps,
    class_names: Sequence[str],
    label_config: LabelConfig,
    config: Config,
) -> list[list[dict[str, Any]] | None]:
    """Result items per task, in task order; None for a task whose image cannot be had (one log line with
    the reason), so the other tasks still get theirs. `model()` is called only when some image was fetched."""
    images: list[AnnotatedImage | None] = []
    for ref in tasks:
        try:
            if not ref.url:
                raise UserError(
                    f"expected data.{label_config.image_key} (the image URL the label config names), "
                    "found none"
                )
            images.append(fetch_task_image(client, ref.task, ref.url))
        except UserError as exc:
            log.warning("project=%s task=%s no prediction: %s", project, ref.task, exc)
            images.append(None)
    found = [image for image in images if image is not None]
    if not found:
        return [None] * len(images)
    dataset = DetectionDataset(Path("/"), tuple(class_names), tuple(found))
    detections = iter(steps.extract(model(), dataset, config)[0])
    return [
        None
        if image is None
        else task_results(next(detections), image.width, image.height, class_names=class_names,
                          label_config=label_config, config=config)
        for image in images
    ]
