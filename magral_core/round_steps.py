"""The real bindings of a round's steps (see `rounds.RoundSteps`): the configured detector, COCO evaluation,
checkpoints and the registered strategies, with MAGRAL's look-up-table records computed by the semi-supervised
proxy. Heavy libraries (torch, torchvision) are imported when a step runs, not when this module is imported.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.config import Config
from magral_core.errors import DataError, UserError
from magral_core.rounds import (
    DETECTOR_FILE,
    IMAGES_FILE,
    LOOKUP_TABLE_FILE,
    MAGRAL_FIT_FILE,
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
        propose_records=propose_records_step,
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
    """Record `index` of the round: below `count_lut_records` one of the random `magral_record_specs`, from
    there on one of the near-policy specs `propose_records_step` saved; the proxy's mAP with that batch."""
    from magral_core.lookup_table import compute_record

    n = len(load_pool(staging / POOL_FILE)["detections"])
    initial = magral_record_specs(n, config)
    if index < len(initial):
        spec = initial[index]
    else:
        pending = load_fit(staging / MAGRAL_FIT_FILE).pending
        if not 0 <= index - len(initial) < len(pending):
            raise ValueError(f"record {index}: the round has {len(initial)} + {len(pending)} records")
        spec = pending[index - len(initial)]
    record = compute_record(spec, (proxy_factory or build_proxy)(staging, config))
    return {
        "indices": record.indices.tolist(),
        "value": record.value,
        "source": record.source,
        "seed": spec.seed,
    }


def _lazy_proxy(staging: Path, config: Config, proxy_factory: ProxyFactory | None
                ) -> Callable[[np.ndarray, int], float]:
    """`proxy(batch, seed)` that builds the round's proxy on first use (a pass over every image)."""
    proxy: list[Callable[[np.ndarray, int], float]] = []

    def evaluate(indices: np.ndarray, seed: int) -> float:
        if not proxy:
            proxy.append((proxy_factory or build_proxy)(staging, config))
        return proxy[0](indices, seed)

    return evaluate


def _records(records: Sequence[Mapping[str, Any]]) -> list[Any]:
    from magral_core.lookup_table import Record

    return [Record(np.asarray(r["indices"], np.int64), float(r["value"]), str(r["source"])) for r in records]


def _pool_of(staging: Path) -> Any:
    from magral_core.strategies.base import Pool

    arrays = load_pool(staging / POOL_FILE)
    return Pool(arrays["embeddings"], tuple(arrays["detections"]), arrays["labeled_embeddings"])


def propose_records_step(
    staging: Path,
    records: Sequence[Mapping[str, Any]],
    config: Config,
    *,
    proxy_factory: ProxyFactory | None = None,
) -> int:
    """MAGRAL's first stage (`strategies.begin_fit`) on the random records the record jobs computed (a
    missing one is computed here): the estimator, the first half of the policy training and the near-policy
    record specs, saved in `staging/MAGRAL_FIT_FILE`. Returns how many near-policy records follow."""
    from magral_core.strategies import begin_fit

    pool = _pool_of(staging)
    fit = begin_fit(pool.features, min(config.budget, len(pool)), _lazy_proxy(staging, config, proxy_factory),
                    magral_settings(config), seed=config.seed, records=_records(records))
    save_fit(staging / MAGRAL_FIT_FILE, fit)
    return len(fit.pending)


def save_fit(path: Path, fit: Any) -> None:
    """Write a `strategies.MagralFit` atomically (the controller's tensors, the rest as JSON text)."""
    import torch

    from magral_core.atomic import atomic_open
    from magral_core.policy import save_state

    report = fit.report
    rest = {
        "rng": fit.rng.bit_generator.state,
        "pending": [{"indices": list(s.indices), "seed": s.seed, "source": s.source} for s in fit.pending],
        "fidelity": report.fidelity,
        "estimator": report.estimator,
        "records": [{"indices": r.indices.tolist(), "value": r.value, "source": r.source}
                    for r in report.records],
        "history": [h.as_dict() for h in report.history],
    }
    with atomic_open(path, "wb") as handle:
        torch.save({"controller": save_state(fit.controller), "rest": json.dumps(rest)}, handle)


def load_fit(path: Path) -> Any:
    """The `strategies.MagralFit` `save_fit` wrote; raises DataError naming the file when it is unreadable."""
    import torch

    from magral_core.lookup_table import RecordSpec
    from magral_core.policy import load_state
    from magral_core.policy_training import TrainingHistory
    from magral_core.strategies import MagralFit, MagralReport

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        rest = json.loads(state["rest"])
        rng = np.random.default_rng()
        rng.bit_generator.state = rest["rng"]
        report = MagralReport(rest["fidelity"], rest["estimator"], _records(rest["records"]),
                              [TrainingHistory(**h) for h in rest["history"]])
        pending = [RecordSpec(tuple(s["indices"]), int(s["seed"]), str(s["source"])) for s in rest["pending"]]
        return MagralFit(load_state(state["controller"]), report, rng, pending)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: expected MAGRAL's saved first stage ({type(exc).__name__}: {exc})") from exc


def fit_magral_step(
    pool: Any,
    records: Sequence[Mapping[str, Any]],
    staging: Path,
    config: Config,
    *,
    proxy_factory: ProxyFactory | None = None,
) -> Any:
    """Fit MAGRAL's controller for this pool on the round's records and write the policy and the look-up
    table into `staging`. After `propose_records_step`: its second stage (`strategies.end_fit`) with the
    near-policy records among `records` (a missing one is computed here); otherwise the whole fit, with the
    random records among `records` reused."""
    import torch

    from magral_core.lookup_table import compute_record, save_records
    from magral_core.policy import save_state
    from magral_core.strategies import end_fit, fit_magral

    evaluate = _lazy_proxy(staging, config, proxy_factory)
    budget = min(config.budget, len(pool))
    settings = magral_settings(config)
    done = _records(records)
    if (staging / MAGRAL_FIT_FILE).is_file():
        fit = load_fit(staging / MAGRAL_FIT_FILE)
        by_batch = {(tuple(r.indices.tolist()), r.source): r for r in done}
        near = [by_batch.get((tuple(s.indices), s.source)) or compute_record(s, evaluate)
                for s in fit.pending]
        strategy, report = end_fit(fit, pool.features, budget, settings, seed=config.seed, records=near)
    else:
        strategy, report = fit_magral(pool.features, budget, evaluate, settings, seed=config.seed,
                                      records=done)
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
