"""A deterministic stand-in for a detector with closed-form metrics (`ToyLearner`), for tests and dry runs
of the protocol."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from magral_core.method.strategies import Pool
from magral_core.simulation.protocol import Metrics, ProxyFn
from magral_core.structures import Detections


@dataclass(frozen=True)
class ToyState:
    """Per-class evidence (object counts seen in the labeled images) and the training seed."""

    evidence: np.ndarray
    seed: int


class ToyLearner:
    """A stand-in for a detector with closed-form metrics, for tests and dry runs of the protocol.

    Each pool image holds Poisson object counts per class (rare classes are rarer). A model's AP for class c
    is 0.9·(1 − exp(−e_c / τ)) where e_c counts the labeled objects of class c, plus seeded noise of
    ±0.005; mAP = 0.6 × mean AP, AP50 = mean AP. Detections of a pool image are one box per object whose
    class probability is the model's AP for that class, so uncertainty is high on poorly learned classes.
    Embeddings are a random projection of the counts plus noise. The proxy adds the candidate batch's
    objects at half weight (unlabeled images help, but less), with seeded noise of ±0.002.
    """

    class_names = ("common", "medium", "rare")

    def __init__(self, pool_size: int = 200, *, dim: int = 8, tau: float = 12.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.counts = rng.poisson(lam=[2.0, 0.8, 0.15], size=(pool_size, 3)).astype(np.float64)  # (N, C)
        projection = rng.normal(size=(3 + dim, dim))
        self.embeddings = np.concatenate([self.counts, rng.normal(size=(pool_size, dim))], 1) @ projection
        self.tau = tau

    @property
    def pool_size(self) -> int:
        return len(self.counts)

    def train(self, labeled: np.ndarray, *, seed: int, previous: ToyState | None = None) -> ToyState:
        """The evidence of `labeled`; `previous` changes nothing (the toy's model is a function of its
        labeled set)."""
        return ToyState(self.counts[np.asarray(labeled, dtype=np.int64)].sum(0), seed)

    def _ap(self, evidence: np.ndarray, seed: int, noise: float) -> np.ndarray:
        jitter = np.random.default_rng(seed).uniform(-noise, noise, size=len(evidence))
        return np.clip(0.9 * (1.0 - np.exp(-evidence / self.tau)) + jitter, 0.0, 1.0)

    def evaluate(self, state: ToyState) -> Metrics:
        ap = self._ap(state.evidence, state.seed, 0.005)
        return Metrics(float(0.6 * ap.mean()), float(ap.mean()),
                       {c: float(0.6 * a) for c, a in zip(self.class_names, ap, strict=True)})

    def pool(self, state: ToyState, unlabeled: np.ndarray, labeled: np.ndarray) -> Pool:
        ap = self._ap(state.evidence, state.seed, 0.0)
        detections = []
        for i in np.asarray(unlabeled, dtype=np.int64):
            labels = np.repeat(np.arange(3), self.counts[i].astype(np.int64))
            probs = np.full((len(labels), 4), 0.0, np.float32)
            probs[np.arange(len(labels)), labels + 1] = ap[labels]
            probs[:, 0] = 1.0 - ap[labels]
            boxes = np.zeros((len(labels), 4), np.float32)
            detections.append(Detections(boxes, ap[labels].astype(np.float32), labels, probs))
        return Pool(self.embeddings[unlabeled], tuple(detections), self.embeddings[labeled])

    def proxy(self, state: ToyState, labeled: np.ndarray, unlabeled: np.ndarray) -> ProxyFn:
        counts = self.counts[np.asarray(unlabeled, dtype=np.int64)]

        def evaluate(batch: np.ndarray, seed: int) -> float:
            evidence = state.evidence + 0.5 * counts[np.asarray(batch, dtype=np.int64)].sum(0)
            return float(0.6 * self._ap(evidence, seed, 0.002).mean())

        return evaluate
