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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from magral_core.config import Config
from magral_core.service import bindings, staging
from magral_core.service.predict import TaskRef, predict_tasks
from magral_core.service.steps import RoundSteps, StudioClient
from magral_core.service.store import ModelStore
from magral_core.studio.label_config import LabelConfig
from magral_core.studio.results import restrict_to_config

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
        client_for: Callable[[int], StudioClient],
        steps: Callable[[], RoundSteps] = bindings.default_steps,
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
                result = restrict_to_config(stored["result"], config)
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
                    version, staging.load_predictions(directory), tuple(metrics.get("class_names", ()))
                )
                self._loaded[project] = loaded
                log.info(
                    "project=%s version=%s loaded stored predictions=%d",
                    project,
                    version,
                    len(loaded.predictions),
                )
            return loaded

    def _model(self, project: int, loaded: LoadedVersion, steps: RoundSteps) -> Any:
        with self._lock:
            current = self._loaded.get(project, loaded)
            if current.model is None or current.version != loaded.version:
                path = self.store.version_dir(project, loaded.version) / staging.DETECTOR_FILE
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
        """Predictions of the cached detector (see `service.predict.predict_tasks`); a task whose image
        cannot be had gets an empty result so the other tasks of the request still get theirs."""
        steps = self.steps()
        refs = []
        for task in tasks:
            data = task.get("data")
            url = data.get(config.image_key) if isinstance(data, Mapping) else None
            refs.append(TaskRef(int(task["id"]), url if isinstance(url, str) else None))
        results = predict_tasks(
            project, refs, client=self.client_for(project), model=lambda: self._model(project, loaded, steps),
            steps=steps, class_names=loaded.class_names, label_config=config, config=self.config,
        )
        return [
            {"model_version": loaded.version, "score": UNRANKED_SCORE, "result": result or []}
            for result in results
        ]
