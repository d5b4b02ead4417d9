"""The real bindings of a round's steps (see `rounds.RoundSteps`): the configured detector, COCO evaluation,
checkpoints and the registered strategies, with MAGRAL's look-up-table records computed by the semi-supervised
proxy. Heavy libraries (torch, torchvision) are imported when a step runs, not when this module is imported.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.rounds import (
    DETECTOR_FILE,
    IMAGES_FILE,
    LOOKUP_TABLE_FILE,
    MIN_LABELED_FOR_VALIDATION,
    POLICY_FILE,
    POOL_FILE,
    PROXY_CACHE_FILE,
    Progress,
    RoundSteps,
    load_images,
    load_pool,
)
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
        count_lut_records=count_lut_records,
        lut_record=lut_record_step,
        rank=rank_step,
        prepare_proxy=prepare_proxy_step,
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
    `strategies.fit_magral` draws first (its `initial_record_specs`), so each can be a separate job. The
    near-policy records depend on the policy trained on these and are computed by the fan-in job."""
    from magral_core.strategies import initial_record_specs

    return initial_record_specs(pool_size, config.budget, magral_settings(config), seed=config.seed)


def count_lut_records(pool_size: int, config: Config) -> int:
    """How many record jobs a MAGRAL round over `pool_size` unlabeled images fans out."""
    return len(magral_record_specs(pool_size, config))


def build_proxy(staging: Path, config: Config) -> Callable[[np.ndarray, int], float]:
    """`proxy(batch, seed) -> mAP` of the round in `staging`: the semi-supervised proxy (see
    `magral_core.proxy`) on the round's detector, its labeled training images plus the pool images at
    `batch` (unlabeled), evaluated on the labeled validation images.

    Its frozen features (a detector pass over every labeled, validation and pool image and their flips) are
    loaded from `staging/PROXY_CACHE_FILE` when present; otherwise they are computed for every image and
    saved there (atomically), so the first caller of a round pays and later ones, in any process sharing
    the staging directory, load. Raises UserError when the round has no labeled validation images.
    """
    from magral_core.proxy import proxy_for

    images = load_images(staging / IMAGES_FILE)
    train, pool, val = images["train"], images["pool"], images.get("val")
    if val is None or train is None or pool is None:
        raise UserError(
            f"MAGRAL needs labeled validation images (at least {MIN_LABELED_FOR_VALIDATION} labeled tasks); "
            "found none"
        )
    model = load_model_step(staging / DETECTOR_FILE)  # the proxy runs on the CPU
    proxy = proxy_for(model, train, pool, val)
    cache = staging / PROXY_CACHE_FILE
    if cache.is_file():
        try:
            proxy.load(cache)
            return proxy
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            # a damaged or foreign file must not fail the round: compute afresh and replace it
            log.warning("proxy cache %s unusable (%s); recomputing", cache, exc)
            proxy = proxy_for(model, train, pool, val)
    proxy.warm(range(len(pool)))
    proxy.save(cache)
    return proxy


def prepare_proxy_step(staging: Path, config: Config) -> None:
    """Compute and save the round's proxy cache (see `build_proxy`) so that record jobs only load it."""
    build_proxy(staging, config)


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
    """Fit MAGRAL's controller for this pool; the records computed by the record jobs are passed in (they are
    `magral_record_specs`), the near-policy records are computed here. Writes the policy and the look-up
    table into `staging`."""
    import torch

    from magral_core.lookup_table import Record, save_records
    from magral_core.policy import save_state
    from magral_core.strategies import fit_magral

    done = [Record(np.asarray(r["indices"], np.int64), float(r["value"]), str(r["source"])) for r in records]
    proxy: list[Callable[[np.ndarray, int], float]] = []

    def evaluate(indices: np.ndarray, seed: int) -> float:
        if not proxy:  # built on first use: its frozen features cost a pass over every image
            proxy.append((proxy_factory or build_proxy)(staging, config))
        return proxy[0](indices, seed)

    budget = min(config.budget, len(pool))
    strategy, report = fit_magral(
        pool.features, budget, evaluate, magral_settings(config), seed=config.seed, records=done
    )
    torch.save(save_state(strategy.controller), staging / POLICY_FILE)
    save_records(staging / LOOKUP_TABLE_FILE, len(pool), report.records)
    log.info(
        "magral fitted records=%d reused=%d estimators=%s",
        len(report.records),
        len(done),
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
