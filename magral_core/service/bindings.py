"""The real bindings of a round's steps (see `steps.RoundSteps`): the configured detector, COCO evaluation,
checkpoints, and every registered strategy as a `RoundStrategy` (heuristics rank; MAGRAL adds its
look-up-table records, `service.magral_round`). Heavy libraries (torch, torchvision) are imported when a step
runs, not when this module is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.config import Config
from magral_core.service import staging as files
from magral_core.service.magral_round import MagralRound
from magral_core.service.steps import PoolArrays, Progress, RoundSteps, RoundStrategy
from magral_core.structures import DetectionDataset, Detections

log = logging.getLogger(__name__)


def default_steps() -> RoundSteps:
    """Steps bound to the project's detector, evaluation and strategies (imported when called)."""
    return RoundSteps(
        train=train_detector_step,
        extract=extract_step,
        evaluate=evaluate_step,
        save_model=save_model_step,
        load_model=load_model_step,
        strategy=round_strategy,
    )


def train_detector_step(
    dataset: DetectionDataset, previous_dir: Path | None, config: Config, progress: Progress,
    val: DetectionDataset | None = None,
) -> Any:
    """Build the configured detector, warm-start it from the previous version (`vision.warm_start`, which
    also says how long a warm-started training runs), train it on `dataset` by the configured schedule
    (`engine.fit_detector`) on `config.device`, where it stays (checkpoints are written from CPU copies);
    `val`, the round's held-out validation tasks, is what a "budget" schedule stops by
    (never part of `dataset`)."""
    from magral_core.vision.detectors import build_detector
    from magral_core.vision.engine import chosen_image_size, fit_detector
    from magral_core.vision.warm_start import warm_start, warm_training

    model = build_detector(
        config.detector,
        num_classes=dataset.num_classes,
        image_size=chosen_image_size(dataset, config),
        weights_dir=config.weights_dir,
        pretrained=True,
        seed=config.seed,
    )
    if previous_dir is not None and (previous_dir / files.DETECTOR_FILE).is_file():
        warm_start(model, load_model_step(previous_dir / files.DETECTOR_FILE))
        config = warm_training(config)
    progress("training", 0.0)
    if config.schedule == "epochs":
        fit_detector(model, dataset, config,
                     on_epoch=lambda epoch, _loss: progress("training", epoch / config.epochs))
    else:
        fit_detector(model, dataset, config, val=val)
    return model


def extract_step(
    model: Any, dataset: DetectionDataset, config: Config
) -> tuple[list[Detections], np.ndarray]:
    """Detections and embeddings of `dataset` (`engine.extract`) with `model` moved to `config.device`
    first (a loaded checkpoint starts on the CPU)."""
    from magral_core.vision.engine import extract, torch_device

    model.to(torch_device(config.device))
    return extract(model, dataset, batch_size=config.batch_size, score_threshold=config.score_threshold)


def evaluate_step(dataset: DetectionDataset, detections: list[Detections]) -> Mapping[str, Any]:
    from magral_core.vision.evaluation import evaluate_coco

    return evaluate_coco(dataset, detections).as_dict()


def save_model_step(model: Any, path: Path, meta: Mapping[str, Any]) -> None:
    from magral_core.vision.checkpoint import save_checkpoint

    save_checkpoint(path, model, meta=dict(meta))


def load_model_step(path: Path) -> Any:
    from magral_core.vision.checkpoint import load_checkpoint

    model, _meta = load_checkpoint(path)
    return model


class HeuristicRound:
    """A strategy that ranks from the pool's features alone (no records, nothing to prepare)."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config

    def records(self, pool_size: int) -> int:
        return 0

    def prepare(self, staging: Path) -> None:
        return None

    def record(self, staging: Path, index: int) -> Mapping[str, Any]:
        raise ValueError(f"strategy {self.name!r} computes no records (asked for record {index})")

    def propose(self, staging: Path, records: Sequence[Mapping[str, Any]]) -> int:
        return 0

    def rank(
        self, pool: PoolArrays, records: Sequence[Mapping[str, Any]], staging: Path
    ) -> tuple[list[int], list[float]]:
        from magral_core.method.strategies import Pool, make_strategy

        chosen = Pool(pool["embeddings"], tuple(pool["detections"]), pool["labeled_embeddings"])
        picks = make_strategy(self.name).rank(chosen, min(self.config.budget, len(chosen)),
                                              np.random.default_rng(self.config.seed))
        return [p.index for p in picks], [p.priority for p in picks]


def round_strategy(name: str, config: Config) -> RoundStrategy:
    """The registered strategy `name` as a round uses it."""
    if name == "magral":
        return MagralRound(config)
    return HeuristicRound(name, config)
