"""[ours] Label-aware retrospective records: what labeling a batch adds, measured where labels are known,
carried to the unlabeled pool by a surrogate over label-free per-image features.

Inside the labeled training images L (the validation part stays apart), each of `folds` seeded splits
holds part of L out as a pseudo-pool Q and keeps the rest as a core C. A record draws a batch of
`batch_size` images of Q (no batch twice in a fold) and its value is the supervised gain

    mAP_val(tail trained on C + batch, true labels) − mAP_val(tail trained on C)

under the same seed (paired; `seeds` seeds averaged, the same seeds for every record). The batch enters
as `heads.train_tail`'s extra images: the core's order and the RoI draws are those of the reference
training, so two records of a fold differ only by their batches (common random numbers). Retraining on the
union C ∪ batch instead reshuffles every step, and that order noise buried the batches' differences. The
tail (`heads.Tail`) is trained on cached frozen features from a fresh initialisation, because the task
detector's own head has already been fit to Q's labels.

The surrogate is additive over images: a batch's gain is the sum of per-image gains g(x) = a + w · x over
standardised label-free features (`image_descriptors`: predicted object count, summed score, summed and
maximum class entropy of the detections, and the first principal components of the backbone embedding).
Each record is one equation, value = |batch| · a + w · Σ x; a ridge regression (w penalised, a not) fits
it, and `evaluate(indices) = Σ over the pool images at indices of (a + w · x)`, so the empty batch is
worth 0, as it is by the records' definition, and a budget other than the records' batch size scales the
gain rather than reusing an average batch's.

Labels are read only for images of L (through `labeled`); the pool enters only through its detections and
embeddings. Cost: `records` + `folds` head trainings once per round (`warm`; `save`/`load` share the fitted
surrogate between processes), then a dot product per evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.method.features import class_distributions, entropy
from magral_core.method.rewards.heads import HeadSettings, TailFeatures, tail_map, train_tail
from magral_core.structures import DetectionDataset, Detections

CACHE_FORMAT = 1
"""Version of the file `RetrospectiveReward.save` writes."""


@dataclass(frozen=True)
class RetrospectiveSettings:
    """Records and surrogate of the retrospective reward."""

    records: int = 24
    """Records (batches of the pseudo-pool) per round."""
    folds: int = 2
    """Core/pseudo-pool splits of L; record r uses split r mod folds."""
    holdout: float = 0.5
    """Share of L in each pseudo-pool."""
    seeds: int = 1
    """Training seeds per record (averaged)."""
    components: int = 2
    """Principal components of the embedding among the surrogate's features."""
    ridge: float = 1.0
    """Ridge penalty on the standardised features."""
    confident: float = 0.5
    """Detections scoring at least this count as predicted objects."""
    head: HeadSettings = field(
        default_factory=lambda: HeadSettings(epochs=20, learning_rate=0.01, reinit=True))
    """Head training of a record: from a fresh initialisation (the detector's head has seen L's labels)."""


def image_descriptors(detections: Sequence[Detections], embeddings: np.ndarray, confident: float,
                      basis: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(N, 4 + k) label-free features per image: confident detections, summed score, summed and maximum
    class entropy of the detections, and the embedding projected on `basis` (k, D) around `centre` (D,)."""
    rows = []
    for det in detections:
        scores = np.asarray(det.scores, np.float64)
        ent = entropy(class_distributions(det)) if len(det) else np.zeros(0)
        rows.append([float((scores >= confident).sum()), float(scores.sum()), float(ent.sum()),
                     float(ent.max()) if len(ent) else 0.0])
    stats = np.asarray(rows, np.float64).reshape(len(detections), 4)
    emb = np.asarray(embeddings, np.float64).reshape(len(detections), -1)
    projected = (emb - centre) @ basis.T if basis.size else np.zeros((len(emb), 0))
    return np.concatenate([stats, projected], axis=1)


@dataclass(frozen=True)
class RetroRecord:
    """One record: positions in L of the batch, its fold, value (paired mAP gain) and seconds it took."""

    indices: tuple[int, ...]
    fold: int
    value: float
    seconds: float


class RetrospectiveReward:
    """See module doc. `labeled` are the labeled training images (with labels) and their detections and
    embeddings under the round's detector; `pool_*` the unlabeled pool's. Records are computed on first use
    (`fit`)."""

    def __init__(self, model: Any, labeled: DetectionDataset, labeled_detections: Sequence[Detections],
                 labeled_embeddings: np.ndarray, pool_detections: Sequence[Detections],
                 pool_embeddings: np.ndarray, val: DetectionDataset, *, batch_size: int, seed: int = 0,
                 settings: RetrospectiveSettings | None = None) -> None:
        if len(labeled) < 4:
            raise ValueError(f"the retrospective reward needs >= 4 labeled images, found {len(labeled)}")
        settings = settings or RetrospectiveSettings()
        self.model, self.settings, self.seed = model, settings, seed
        self.labeled, self.val = TailFeatures(model, labeled), TailFeatures(model, val)
        lab_emb = np.asarray(labeled_embeddings, np.float64).reshape(len(labeled), -1)
        pool_emb = np.asarray(pool_embeddings, np.float64).reshape(len(pool_detections), -1)
        both = np.concatenate([lab_emb, pool_emb])
        centre = both.mean(0)
        _, _, vt = np.linalg.svd(both - centre, full_matrices=False)
        basis = vt[: settings.components]
        lab_x = image_descriptors(labeled_detections, lab_emb, settings.confident, basis, centre)
        pool_x = image_descriptors(pool_detections, pool_emb, settings.confident, basis, centre)
        allx = np.concatenate([lab_x, pool_x])
        mean, std = allx.mean(0), allx.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        self.labeled_x, self.pool_x = (lab_x - mean) / std, (pool_x - mean) / std
        rng = np.random.default_rng([seed, 7])
        n_q = min(len(labeled) - 2, max(2, round(settings.holdout * len(labeled))))
        self.splits = []
        for _ in range(settings.folds):
            order = rng.permutation(len(labeled))
            self.splits.append((np.sort(order[n_q:]), np.sort(order[:n_q])))
        self.batch_size = max(1, min(batch_size, n_q // 2))
        self.records: list[RetroRecord] = []
        self.weights: np.ndarray | None = None
        self._reference: dict[tuple[int, int], float] = {}

    def _map(self, core: np.ndarray, batch: np.ndarray, seed: int) -> float:
        targets = [self.labeled.targets(int(i)) for i in core]
        extra = [self.labeled.targets(int(i)) for i in batch]
        tail = train_tail(self.model, targets, extra, self.settings.head, seed=seed)
        return tail_map(tail, self.val, self.settings.head.score_threshold)

    def record(self, fold: int, batch: np.ndarray) -> RetroRecord:
        """The paired gain of adding `batch` (positions in L, inside fold's pseudo-pool) to fold's core."""
        start = time.perf_counter()
        core = self.splits[fold][0]
        empty = np.zeros(0, np.int64)
        gains = []
        for s in range(self.seed, self.seed + self.settings.seeds):  # the same seeds for every record
            if (fold, s) not in self._reference:
                self._reference[(fold, s)] = self._map(core, empty, s)
            gains.append(self._map(core, np.asarray(batch), s) - self._reference[(fold, s)])
        return RetroRecord(tuple(int(i) for i in batch), fold, float(np.mean(gains)),
                           time.perf_counter() - start)

    def _batches(self) -> list[tuple[int, np.ndarray]]:
        """`records` (fold, batch) pairs, record r in fold r mod folds, no batch twice in a fold while the
        fold has batches left (a repeated batch would repeat its record exactly)."""
        rng = np.random.default_rng([self.seed, 8])
        seen: list[set[tuple[int, ...]]] = [set() for _ in range(self.settings.folds)]
        out: list[tuple[int, np.ndarray]] = []
        for r in range(self.settings.records):
            fold = r % self.settings.folds
            q = self.splits[fold][1]
            exhausted = len(seen[fold]) >= math.comb(len(q), self.batch_size)
            while True:
                batch = np.sort(rng.choice(q, self.batch_size, replace=False))
                key = tuple(int(i) for i in batch)
                if exhausted or key not in seen[fold]:
                    break
            seen[fold].add(key)
            out.append((fold, batch))
        return out

    def fit(self) -> None:
        """Compute the records and the surrogate (once)."""
        if self.weights is not None:
            return
        for fold, batch in self._batches():
            self.records.append(self.record(fold, batch))
        self.weights = additive_ridge([self.labeled_x[list(rec.indices)] for rec in self.records],
                                      np.array([rec.value for rec in self.records]), self.settings.ridge)

    def warm(self, pool_indices: Iterable[int] = ()) -> None:
        """The round's one-off work: the records and the surrogate (`fit`; the pool enters only through
        its features, so `pool_indices` need nothing)."""
        self.fit()

    def save(self, path: Path) -> None:
        """Write the records and the fitted surrogate (`fit` first) to `path` atomically."""
        import torch

        from magral_core.atomic import atomic_open

        self.fit()
        assert self.weights is not None
        state = {"format": CACHE_FORMAT, "kind": "retrospective", "seed": self.seed,
                 "weights": torch.as_tensor(self.weights, dtype=torch.float64),
                 "records": [{"indices": list(r.indices), "fold": r.fold, "value": r.value,
                              "seconds": r.seconds} for r in self.records]}
        with atomic_open(path, "wb") as handle:
            torch.save(state, handle)

    def load(self, path: Path) -> None:
        """Adopt the records and surrogate `save` wrote (no head is trained). Raises ValueError for another
        format, seed or feature count; OSError/pickle errors for an unreadable file."""
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        if (not isinstance(state, dict) or state.get("format") != CACHE_FORMAT
                or state.get("kind") != "retrospective" or state.get("seed") != self.seed):
            raise ValueError(f"{path}: expected a retrospective reward cache of format {CACHE_FORMAT} for "
                             f"seed {self.seed}")
        weights = state["weights"].numpy().astype(np.float64)
        if weights.shape != (1 + self.pool_x.shape[1],):
            raise ValueError(f"{path}: {weights.shape[0]} weights for {self.pool_x.shape[1]} features")
        self.records = [RetroRecord(tuple(int(i) for i in r["indices"]), int(r["fold"]), float(r["value"]),
                                    float(r["seconds"])) for r in state["records"]]
        self.weights = weights

    def __call__(self, indices: np.ndarray, seed: int) -> float:
        """Surrogate gain of the pool images at `indices`: the sum of their per-image gains, 0 for none (the
        seed is unused: the surrogate is fixed once the records are)."""
        self.fit()
        assert self.weights is not None
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return float(len(idx) * self.weights[0] + self.pool_x[idx].sum(0) @ self.weights[1:])

    evaluate = __call__


def additive_ridge(batches: Sequence[np.ndarray], values: np.ndarray, ridge: float) -> np.ndarray:
    """(1 + F,) weights [a, w] of value ≈ Σ over a batch's rows x of (a + w · x), by least squares with
    `ridge` × |w|² added (a is not penalised): `batches` are (n_r, F) feature rows of record r's images,
    `values` (R,) the records' gains."""
    counts = np.array([len(b) for b in batches], np.float64)
    sums = np.array([np.asarray(b, np.float64).sum(0) for b in batches])  # (R, F)
    design = np.column_stack([counts, sums])  # (R, 1 + F)
    penalty = np.diag([0.0] + [ridge] * sums.shape[1])
    return np.linalg.solve(design.T @ design + penalty, design.T @ np.asarray(values, np.float64))


def with_head(settings: RetrospectiveSettings, **changes: Any) -> RetrospectiveSettings:
    """`settings` with its head settings changed."""
    return replace(settings, head=replace(settings.head, **changes))
