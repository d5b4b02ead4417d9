"""`/predict` without long work: answers from the served version's stored predictions, and runs the detector
(kept in memory per project, reloaded only when the published version changes) only for tasks that version
did not score (tasks created after its round).

Before any version exists every task gets an empty result with model_version "untrained": Label Studio
needs exactly one item per task, and the empty prediction is replaced once a trained version exists
(a new version string makes Label Studio ask again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magral_core import ranking, round_steps, rounds
from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.label_config import LabelConfig
from magral_core.store import ModelStore
from magral_core.structures import AnnotatedImage, DetectionDataset, Detections

log = logging.getLogger(__name__)

UNTRAINED = "untrained"
UNRANKED_SCORE = 1.0  # tasks outside the version's ranking are served after the ranked ones


@dataclass(frozen=True)
class LoadedVersion:
    version: str
    predictions: Mapping[int, Mapping[str, Any]]
    class_names: tuple[str, ...]
    model: Any | None = None


class Predictor:
    """Per-process cache of each project's served version (stored predictions, detector loaded lazily)."""

    def __init__(
        self,
        store: ModelStore,
        config: Config,
        *,
        client_for: Callable[[int], Any],
        steps: Callable[[], rounds.RoundSteps] = round_steps.default_steps,
    ) -> None:
        self.store = store
        self.config = config
        self.client_for = client_for
        self.steps = steps
        self._loaded: dict[int, LoadedVersion] = {}
        self._lock = threading.Lock()
        self.loads = 0  # detector loads so far (reloads happen only on a version change)

    def predict(
        self, project: int, tasks: Sequence[Mapping[str, Any]], config: LabelConfig
    ) -> list[dict[str, Any]]:
        """One prediction per task, in task order."""
        version = self.store.current_version(project)
        if version is None:
            return [{"model_version": UNTRAINED, "result": []} for _ in tasks]
        loaded = self._version(project, version)
        out: list[dict[str, Any] | None] = []
        missing: list[int] = []
        for position, task in enumerate(tasks):
            stored = loaded.predictions.get(int(task["id"]))
            if stored is None:
                missing.append(position)
                out.append(None)
            else:
                result = ranking.restrict_to_config(stored["result"], config)
                out.append({"model_version": version, "score": stored["score"], "result": result})
        if missing:
            computed = self._run_detector(project, loaded, [tasks[i] for i in missing], config)
            for position, item in zip(missing, computed, strict=True):
                out[position] = item
        return [item for item in out if item is not None]

    def _version(self, project: int, version: str) -> LoadedVersion:
        with self._lock:
            loaded = self._loaded.get(project)
            if loaded is None or loaded.version != version:
                directory = self.store.version_dir(project, version)
                metrics = self.store.load_metrics(project, version)
                loaded = LoadedVersion(
                    version, rounds.load_predictions(directory), tuple(metrics.get("class_names", ()))
                )
                self._loaded[project] = loaded
                log.info(
                    "project=%s version=%s loaded stored predictions=%d",
                    project,
                    version,
                    len(loaded.predictions),
                )
            return loaded

    def _model(self, project: int, loaded: LoadedVersion, steps: rounds.RoundSteps) -> Any:
        with self._lock:
            current = self._loaded.get(project, loaded)
            if current.model is None or current.version != loaded.version:
                path = self.store.version_dir(project, loaded.version) / rounds.DETECTOR_FILE
                current = LoadedVersion(
                    loaded.version, loaded.predictions, loaded.class_names, steps.load_model(path)
                )
                self._loaded[project] = current
                self.loads += 1
                log.info("project=%s version=%s detector loaded", project, loaded.version)
            return current.model

    def _run_detector(
        self, project: int, loaded: LoadedVersion, tasks: Sequence[Mapping[str, Any]], config: LabelConfig
    ) -> list[dict[str, Any]]:
        """Predictions of the cached detector; a task whose image cannot be had gets an empty result (one
        log line) so the other tasks of the request still get theirs."""
        from magral_core.images import image_size

        steps = self.steps()
        client = self.client_for(project)
        images: list[AnnotatedImage | None] = []
        for task in tasks:
            try:
                data = task.get("data")
                url = data.get(config.image_key) if isinstance(data, Mapping) else None
                if not isinstance(url, str) or not url:
                    raise UserError(
                        f"expected data.{config.image_key} (the image URL the label config names), "
                        f"found {data!r:.80}"
                    )
                path = Path(client.fetch_image(url, task_id=int(task["id"])))
                width, height = image_size(path)
                images.append(AnnotatedImage(int(task["id"]), str(path), width, height))
            except UserError as exc:
                log.warning("project=%s task=%s no prediction: %s", project, task.get("id"), exc)
                images.append(None)
        found = [image for image in images if image is not None]
        detections: Iterator[Detections] = iter([])
        if found:
            model = self._model(project, loaded, steps)
            dataset = DetectionDataset(Path("/"), loaded.class_names, tuple(found))
            detections = iter(steps.extract(model, dataset, self.config)[0])
        out = []
        for image in images:
            result = (
                []
                if image is None
                else ranking.detections_to_results(
                    next(detections),
                    width=image.width,
                    height=image.height,
                    class_names=loaded.class_names,
                    config=config,
                    threshold=self.config.prediction_threshold,
                )
            )
            out.append({"model_version": loaded.version, "score": UNRANKED_SCORE, "result": result})
        return out
