"""`DetectorLearner`: the protocol's `Learner` backed by the configured detector on a fully labeled dataset.

`train` builds a fresh detector (seeded), warm-started from the curve's previous model when given
(`vision.warm_start`, as a service round starts from the served version), and trains it with the configured
schedule on the labeled pool images less the proxy's validation part (`proxy.split_validation`, as the service
holds its validation tasks out of training); `pool` runs one `extract` pass over the unlabeled and the labeled
pool images; `proxy` is the configured reward (`magral_core.method.rewards`, `Config.reward`; the paper's
proxy by default) on that validation part, with the candidate batch unlabeled. Only `evaluate` reads the test
split. Every training and pass shares one `TrunkCache` (`Config.trunk_cache_mib`): every detector built here
has the same frozen ImageNet trunk. Heavy modules are imported on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from magral_core.config import Config
from magral_core.method.strategies import Pool
from magral_core.simulation.protocol import Metrics, ProxyFn
from magral_core.structures import DetectionDataset


class DetectorLearner:
    """The configured detector trained on positions of `pool` and measured on `test`."""

    def __init__(self, pool: DetectionDataset, test: DetectionDataset, config: Config) -> None:
        self.pool_data = pool
        self._test = test
        self.config = config
        from magral_core.vision.engine import trunk_cache_of

        self.trunk = trunk_cache_of(config)

    @property
    def pool_size(self) -> int:
        return len(self.pool_data)

    def split(self, labeled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) positions of `labeled`: the detector trains on the first, the proxy measures on the
        second."""
        from magral_core.method.proxy import split_validation

        return split_validation(labeled, self.config.seed)

    def train(self, labeled: np.ndarray, *, seed: int, previous: Any = None) -> Any:
        from magral_core.vision.detectors import build_detector
        from magral_core.vision.engine import chosen_image_size, fit_detector
        from magral_core.vision.warm_start import warm_start, warm_training

        train, val = self.split(labeled)
        train_set = self.pool_data.subset(train.tolist())
        model = build_detector(self.config.detector, num_classes=self.pool_data.num_classes,
                               image_size=chosen_image_size(train_set, self.config),
                               weights_dir=self.config.weights_dir, seed=seed)
        config = self.config.replace(seed=seed)
        if previous is not None:  # as a service round starts from the served version
            warm_start(model, previous)
            config = warm_training(config)
        # the proxy's validation part also stops a "budget" schedule: one carve of the labeled set
        fit_detector(model, train_set, config, val=self.pool_data.subset(val.tolist()), trunk=self.trunk)
        return model

    def evaluate(self, state: Any) -> Metrics:
        from magral_core.vision.engine import predict
        from magral_core.vision.evaluation import evaluate_coco

        result = evaluate_coco(self._test, predict(state, self._test, trunk=self.trunk,
                                                   score_threshold=self.config.score_threshold))
        return Metrics(result.map, result.ap50, dict(result.per_class_ap))

    def pool(self, state: Any, unlabeled: np.ndarray, labeled: np.ndarray) -> Pool:
        from magral_core.vision.engine import extract

        detections, embeddings = extract(state, self.pool_data.subset(np.asarray(unlabeled).tolist()),
                                         score_threshold=self.config.score_threshold, trunk=self.trunk)
        _, labeled_embeddings = extract(state, self.pool_data.subset(np.asarray(labeled).tolist()),
                                        trunk=self.trunk)
        return Pool(embeddings, tuple(detections), labeled_embeddings)

    def proxy(self, state: Any, labeled: np.ndarray, unlabeled: np.ndarray) -> ProxyFn | None:
        from magral_core.method.rewards import RewardRound, make_reward, needs_detections
        from magral_core.vision.engine import extract

        train, val = self.split(labeled)
        pool, labeled_set = self.pool_data.subset(unlabeled.tolist()), self.pool_data.subset(train.tolist())
        round_ = RewardRound(state, labeled_set, self.pool_data.subset(val.tolist()), pool)
        if needs_detections(self.config.reward):  # label-free detector outputs, pool and labeled images
            pool_det, pool_emb = extract(state, pool, score_threshold=self.config.score_threshold,
                                         trunk=self.trunk)
            lab_det, lab_emb = extract(state, labeled_set, score_threshold=self.config.score_threshold,
                                       trunk=self.trunk)
            round_ = RewardRound(state, labeled_set, round_.val, pool, tuple(pool_det), pool_emb,
                                 tuple(lab_det), lab_emb)
        return make_reward(self.config.reward, round_, budget=self.config.budget,
                           score_threshold=self.config.score_threshold, seed=self.config.seed)
