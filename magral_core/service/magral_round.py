"""MAGRAL as a round's strategy (`steps.RoundStrategy`): look-up-table records computed by the configured
reward (`MAGRAL_REWARD`, `method.rewards.make_reward`: the paper's proxy by default) as separate jobs in two
stages (uniformly random batches first; after the policy's first training stage, batches near the policy),
then the policy's second stage and the ranking.

The reward's one-off work is done once, by `prepare` at the end of the prepare stage, and loaded by every
record job: the proxy's and the pseudo-label reward's frozen features (a detector pass over every labeled,
validation and pool image), the retrospective reward's records and fitted surrogate (and the labeled
images' detections it reads). Heavy libraries are imported when a method runs, not when this module is
imported.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from magral_core.config import Config
from magral_core.errors import UserError
from magral_core.service import staging as files
from magral_core.service.steps import PoolArrays
from magral_core.service.tasks import MIN_LABELED_FOR_VALIDATION

if TYPE_CHECKING:  # the method's types, imported when a method runs (they pull in torch)
    from magral_core.method.lookup_table import RecordSpec
    from magral_core.method.strategies import MagralSettings, MagralStrategy, Pool

log = logging.getLogger(__name__)

Reward = Callable[[np.ndarray, int], float]
"""`reward(batch, seed) -> value`: batch = positions in the round's unlabeled pool."""
ProxyFactory = Callable[[Path, Config], Reward]


def magral_settings(config: Config) -> MagralSettings:
    """MAGRAL's fitting settings from the config (records, neighbours, policy updates, seed)."""
    from magral_core.method.policy_training import TrainingSettings
    from magral_core.method.strategies import MagralSettings

    return MagralSettings(
        records=config.lut_records,
        neighbours=config.lut_neighbours,
        training=TrainingSettings(updates=config.policy_episodes, seed=config.seed),
    )


def magral_record_specs(pool_size: int, config: Config) -> list[RecordSpec]:
    """The look-up-table records that can be computed before any policy exists: the uniformly random batches
    `strategies.fit_magral` draws first (its `initial_record_specs`), so each can be a separate job."""
    from magral_core.method.strategies import initial_record_specs

    return initial_record_specs(pool_size, config.budget, magral_settings(config), seed=config.seed)


class SharedReward(Protocol):
    """A reward whose one-off work can be shared between processes (every estimator of
    `method.rewards`)."""

    def __call__(self, indices: np.ndarray, seed: int) -> float: ...
    def warm(self, pool_indices: Iterable[int] = ...) -> None: ...
    def save(self, path: Path) -> None: ...
    def load(self, path: Path) -> None: ...


def reward_cache_file(name: str) -> str:
    """The staging file holding reward `name`'s one-off work (`staging` owns the names)."""
    return files.PROXY_CACHE_FILE if name == "proxy" else files.REWARD_CACHE_FILE


def _labeled_outputs(staging: Path, model: Any, train: Any, config: Config) -> tuple[list[Any], np.ndarray]:
    """Detections and embeddings of the labeled training images under the round's detector: loaded from
    `staging/LABELED_FILE`, else computed (one detector pass, as the prepare stage's over the pool) and
    saved there."""
    path = staging / files.LABELED_FILE
    if path.is_file():
        try:
            arrays = files.load_pool(path)
            if len(arrays["detections"]) == len(train):
                return list(arrays["detections"]), np.asarray(arrays["embeddings"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("labeled outputs %s unusable (%s); recomputing", path, exc)
    from magral_core.vision.engine import extract

    detections, embeddings = extract(model, train, batch_size=config.batch_size,
                                     score_threshold=config.score_threshold)
    files.save_pool(path, detections, np.asarray(embeddings), np.zeros((0, np.asarray(embeddings).shape[1])))
    return list(detections), np.asarray(embeddings)


def build_reward(staging: Path, config: Config, name: str | None = None) -> Reward:
    """`reward(batch, seed) -> value` of the round in `staging`: the reward `name` (default
    `config.reward`, MAGRAL_REWARD) built by `method.rewards.make_reward` on the round's detector, its
    labeled training images, the pool (its detections and embeddings from `POOL_FILE`, for the rewards that
    read them) and the labeled validation images, which the detector never trained on.

    Its one-off work (see the module doc) is loaded from the staging file `reward_cache_file(name)` when
    present; otherwise it is done and saved there (atomically), so the first caller of a round pays and
    later ones, in any process sharing the staging directory, load. An unusable file is recomputed and
    replaced. Raises UserError when the round has no labeled validation images.
    """
    from magral_core.method import rewards
    from magral_core.vision.checkpoint import load_checkpoint
    from magral_core.vision.engine import torch_device

    name = name or config.reward
    images = files.load_images(staging / files.IMAGES_FILE)
    train, pool, val = images["train"], images["pool"], images.get("val")
    if val is None or train is None or pool is None:
        raise UserError(
            f"MAGRAL needs labeled validation images (at least {MIN_LABELED_FOR_VALIDATION} labeled tasks); "
            "found none"
        )
    model, _meta = load_checkpoint(staging / files.DETECTOR_FILE)
    model.to(torch_device(config.device))  # caching and every record run there (caches hold CPU tensors)
    cache = staging / reward_cache_file(name)

    def make() -> SharedReward:
        round_ = rewards.RewardRound(model, train, val, pool)
        if rewards.needs_detections(name):
            arrays = files.load_pool(staging / files.POOL_FILE)
            lab_det, lab_emb = (_labeled_outputs(staging, model, train, config) if name == "retrospective"
                                else ([], np.asarray(arrays["labeled_embeddings"])))
            round_ = rewards.RewardRound(model, train, val, pool, tuple(arrays["detections"]),
                                         np.asarray(arrays["embeddings"]), tuple(lab_det), lab_emb)
        reward = rewards.make_reward(name, round_, budget=min(config.budget, len(pool)),
                                     score_threshold=config.score_threshold, seed=config.seed)
        return cast(SharedReward, reward)

    reward = make()
    if cache.is_file():
        try:
            reward.load(cache)
            return reward
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            # a damaged or foreign file must not fail the round: compute afresh and replace it
            log.warning("%s reward cache %s unusable (%s); recomputing", name, cache, exc)
            reward = make()
    reward.warm(range(len(pool)))
    reward.save(cache)
    return reward


def build_proxy(staging: Path, config: Config) -> Reward:
    """The paper's semi-supervised proxy (`magral_core.method.proxy`) of the round in `staging`, whatever
    `config.reward` says: `build_reward(staging, config, "proxy")`."""
    return build_reward(staging, config, "proxy")


def _features(pool: Pool) -> np.ndarray:
    """The pool's (N, F) per-image features (always filled by `Pool`)."""
    if pool.features is None:
        raise ValueError("expected a Pool with its features computed, found none")
    return pool.features


def _pool_of(arrays: PoolArrays) -> Pool:
    from magral_core.method.strategies import Pool

    return Pool(arrays["embeddings"], tuple(arrays["detections"]), arrays["labeled_embeddings"])


class MagralRound:
    """MAGRAL in a round; `proxy_factory(staging, config)` gives the reward (default `build_reward`: the
    configured one)."""

    name = "magral"

    def __init__(self, config: Config, proxy_factory: ProxyFactory | None = None) -> None:
        self.config = config
        self.proxy_factory = proxy_factory or build_reward

    def records(self, pool_size: int) -> int:
        return len(magral_record_specs(pool_size, self.config))

    def prepare(self, staging: Path) -> None:
        self.proxy_factory(staging, self.config)

    def _lazy_reward(self, staging: Path) -> Reward:
        """The reward, built on first use (a pass over every image when the cache is absent)."""
        built: list[Reward] = []

        def evaluate(indices: np.ndarray, seed: int) -> float:
            if not built:
                built.append(self.proxy_factory(staging, self.config))
            return built[0](indices, seed)

        return evaluate

    def record(self, staging: Path, index: int) -> Mapping[str, Any]:
        """Record `index`: below `records(...)` one of the random `magral_record_specs`, from there on one of
        the near-policy specs `propose` saved; the reward of that batch."""
        from magral_core.method.lookup_table import compute_record
        from magral_core.method.strategies.magral_state import load_fit

        n = len(files.load_pool(staging / files.POOL_FILE)["detections"])
        initial = magral_record_specs(n, self.config)
        if index < len(initial):
            spec = initial[index]
        else:
            pending = load_fit(staging / files.MAGRAL_FIT_FILE).pending
            if not 0 <= index - len(initial) < len(pending):
                raise ValueError(f"record {index}: the round has {len(initial)} + {len(pending)} records")
            spec = pending[index - len(initial)]
        record = compute_record(spec, self.proxy_factory(staging, self.config))
        return {"indices": record.indices.tolist(), "value": record.value, "source": record.source,
                "seed": spec.seed}

    def propose(self, staging: Path, records: Sequence[Mapping[str, Any]]) -> int:
        """MAGRAL's first stage (`strategies.begin_fit`) on the random records the record jobs computed (a
        missing one is computed here): the estimator, the first half of the policy training and the
        near-policy record specs, saved in `staging/MAGRAL_FIT_FILE`. Returns how many records follow."""
        from magral_core.method.strategies import begin_fit
        from magral_core.method.strategies.magral_state import records_from_json, save_fit

        pool = _pool_of(files.load_pool(staging / files.POOL_FILE))
        fit = begin_fit(_features(pool), min(self.config.budget, len(pool)), self._lazy_reward(staging),
                        magral_settings(self.config), seed=self.config.seed,
                        records=records_from_json(records))
        save_fit(staging / files.MAGRAL_FIT_FILE, fit)
        return len(fit.pending)

    def fit(self, pool: Pool, records: Sequence[Mapping[str, Any]], staging: Path) -> MagralStrategy:
        """Fit the controller for this pool on the round's records and write the policy and the look-up
        table into `staging`. After `propose`: its second stage (`strategies.end_fit`) with the near-policy
        records among `records` (a missing one is computed here); otherwise the whole fit, with the random
        records among `records` reused."""
        import torch

        from magral_core.method.lookup_table import compute_record, save_records
        from magral_core.method.policy import save_state
        from magral_core.method.strategies import end_fit, fit_magral
        from magral_core.method.strategies.magral_state import load_fit, records_from_json

        config = self.config
        evaluate = self._lazy_reward(staging)
        budget = min(config.budget, len(pool))
        settings = magral_settings(config)
        done = records_from_json(records)
        if (staging / files.MAGRAL_FIT_FILE).is_file():
            fit = load_fit(staging / files.MAGRAL_FIT_FILE)
            by_batch = {(tuple(r.indices.tolist()), r.source): r for r in done}
            near = [by_batch.get((tuple(s.indices), s.source)) or compute_record(s, evaluate)
                    for s in fit.pending]
            strategy, report = end_fit(fit, _features(pool), budget, settings, seed=config.seed, records=near)
        else:
            strategy, report = fit_magral(_features(pool), budget, evaluate, settings, seed=config.seed,
                                          records=done)
        torch.save(save_state(strategy.controller), staging / files.POLICY_FILE)
        save_records(staging / files.LOOKUP_TABLE_FILE, len(pool), report.records)
        log.info("magral fitted records=%d reused=%d estimators=%s", len(report.records), len(done),
                 ",".join(report.estimator))
        return strategy

    def rank(
        self, pool: PoolArrays, records: Sequence[Mapping[str, Any]], staging: Path
    ) -> tuple[list[int], list[float]]:
        chosen_pool = _pool_of(pool)
        strategy = self.fit(chosen_pool, records, staging)
        picks = strategy.rank(chosen_pool, min(self.config.budget, len(chosen_pool)),
                              np.random.default_rng(self.config.seed))
        return [p.index for p in picks], [p.priority for p in picks]
