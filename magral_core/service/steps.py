"""The interfaces a round's stages are written against: the Label Studio calls they make, the model-dependent
operations (`RoundSteps`) and how a strategy takes part in a round (`RoundStrategy`). `service.bindings`
binds the real detector, evaluation and strategies; tests bind toys with known answers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from magral_core.config import Config
from magral_core.structures import DetectionDataset, Detections

Progress = Callable[[str, float], None]
"""`progress(stage, fraction in [0, 1])`."""

PoolArrays = Mapping[str, Any]
"""`staging.load_pool`'s {"detections": list[Detections], "embeddings": (N, D), "labeled_embeddings"}."""


class StudioClient(Protocol):
    """The Label Studio calls a round and `/predict` make (see `magral_core.studio.LabelStudioClient`)."""

    def get_project(self, project_id: int) -> Mapping[str, Any]: ...
    def list_tasks(self, project_id: int, *, image_key: str | None = None) -> Sequence[Any]: ...
    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int: ...
    def serve_in_ranked_order(self, project_id: int, model_version: str) -> None: ...
    def fetch_image(self, image: str, *, task_id: int) -> Path: ...


class StudioAdmin(StudioClient, Protocol):
    """A worker's client: the round's calls and the project's webhook settings."""

    def add_webhook_header(self, project_id: int, prefix: str, headers: Mapping[str, str]) -> int: ...
    def model_versions(self, project_id: int) -> dict[str, int]: ...
    def delete_predictions(self, project_id: int, keep_versions: Collection[str]) -> int: ...


class RoundStrategy(Protocol):
    """How one strategy takes part in a round. A heuristic ranks and needs nothing else (no records, nothing
    to prepare or propose); MAGRAL computes look-up-table records as separate jobs in two stages.

    - `records(pool_size)`: record jobs to fan out after `prepare` (0: none);
    - `prepare(staging)`: work every record job shares, done once at the end of the prepare stage;
    - `record(staging, index)`: one JSON-able record (independent of the others);
    - `propose(staging, records)`: after the first records, how many more (indices from `records(...)` on);
    - `rank(pool, records, staging)`: pool positions best first and their priorities; may write its own
      artefacts (MAGRAL: policy, look-up table) into `staging`.
    """

    name: str

    def records(self, pool_size: int) -> int: ...
    def prepare(self, staging: Path) -> None: ...
    def record(self, staging: Path, index: int) -> Mapping[str, Any]: ...
    def propose(self, staging: Path, records: Sequence[Mapping[str, Any]]) -> int: ...
    def rank(
        self, pool: PoolArrays, records: Sequence[Mapping[str, Any]], staging: Path
    ) -> tuple[list[int], list[float]]: ...


@dataclass(frozen=True)
class RoundSteps:
    """The model-dependent operations of a round.

    - `train(dataset, previous_dir, config, progress, val) -> model`: a detector for `dataset.class_names`,
      warm-started from the detector in `previous_dir` (a published version) when given; `val` is the
      round's held-out validation tasks (never part of `dataset`, None when there are none), what a
      "budget" schedule stops by;
    - `extract(model, dataset, config) -> (detections, embeddings (N, D))`;
    - `evaluate(dataset, detections) -> {"map", "ap50", "per_class_ap"}`;
    - `save_model(model, path, meta)` / `load_model(path) -> model`;
    - `strategy(name, config) -> RoundStrategy`: the registered strategy `name` as a round uses it.
    """

    train: Callable[[DetectionDataset, Path | None, Config, Progress, DetectionDataset | None], Any]
    extract: Callable[[Any, DetectionDataset, Config], tuple[list[Detections], np.ndarray]]
    evaluate: Callable[[DetectionDataset, list[Detections]], Mapping[str, Any]]
    save_model: Callable[[Any, Path, Mapping[str, Any]], None]
    load_model: Callable[[Path], Any]
    strategy: Callable[[str, Config], RoundStrategy]
