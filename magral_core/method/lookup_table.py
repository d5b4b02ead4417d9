"""The reward look-up table: (candidate batch → proxy mAP) records and estimators built on them.

A record is a set of pool indices and the proxy detector's mAP when that set is added (unlabeled) to the
labeled set. Two estimators share the `Estimator` interface:

- `LookupTable`: weighted mean of the M nearest records, distance = L2 between multi-hot index vectors,
  ‖a − r‖² = |a| + |r| − 2|a ∩ r|, computed from overlaps (records are a sparse (R, N) matrix; the overlaps of
  C candidates are one sparse product). Weights are 1/distance; a record equal to the candidate (distance 0)
  gives its value outright (the mean if several do).
- `RidgeSurrogate`: ridge regression of mAP on the multi-hot indicators ("indicator") or on the sum of the
  batch's per-image features ("features"), solved in kernel form (R × R), the penalty picked by closed-form
  leave-one-out error.

`fidelity` is the Spearman ρ between estimated and actual values on held-out records; `best_estimator`
keeps whichever estimator has the higher held-out ρ. Record generation (`random_batches`, `swapped_batches`,
`policy_batches`) makes `RecordSpec`s; `compute_record(spec, evaluate)` turns one spec into one record, so a
queue can compute records in parallel.

Kept as one module because the table, the ridge surrogate, the fidelity measures and the record generators all
speak the one record format.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr

from magral_core.atomic import atomic_open
from magral_core.errors import DataError
from magral_core.method.policy import Controller


@dataclass(frozen=True, eq=False)
class Record:
    """One table entry: sorted unique pool `indices` and the proxy `value` (mAP) measured for them."""

    indices: np.ndarray
    value: float
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", np.unique(np.asarray(self.indices, dtype=np.int64)))


@dataclass(frozen=True)
class RecordSpec:
    """What to compute for one record: the batch, a seed for the proxy's training, and where it came from
    ("random", "policy", "swap")."""

    indices: tuple[int, ...]
    seed: int = 0
    source: str = "random"


def compute_record(spec: RecordSpec, evaluate: Callable[[np.ndarray, int], float]) -> Record:
    """Evaluate one spec: `evaluate(indices, seed)` trains the proxy with that batch and returns its mAP."""
    indices = np.asarray(spec.indices, dtype=np.int64)
    return Record(indices, float(evaluate(indices, spec.seed)), spec.source)


def _multi_hot(candidates: Sequence[np.ndarray], pool_size: int) -> sp.csr_matrix:
    """(C, N) sparse 0/1 matrix; raises ValueError for an index outside [0, N)."""
    rows = [np.unique(np.asarray(c, dtype=np.int64)) for c in candidates]
    cols = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if len(cols) and (cols.min() < 0 or cols.max() >= pool_size):
        raise ValueError(f"pool indices must lie in [0, {pool_size}), found {cols.min()}..{cols.max()}")
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    data = np.ones(len(cols), dtype=np.float64)
    return sp.csr_matrix((data, cols, indptr), shape=(len(rows), pool_size))


class Estimator(Protocol):
    """Estimates the proxy value of candidate batches."""

    name: str

    def estimate_many(self, candidates: Sequence[np.ndarray]) -> np.ndarray: ...


def estimate(estimator: Estimator, candidate: np.ndarray) -> float:
    """One candidate's estimate."""
    return float(estimator.estimate_many([candidate])[0])


class LookupTable:
    """Nearest-record estimator (see module docstring). `neighbours` = M."""

    name = "lut"

    def __init__(self, pool_size: int, records: Sequence[Record], *, neighbours: int = 4) -> None:
        if not records:
            raise ValueError("a look-up table needs at least one record")
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, found {neighbours}")
        self.pool_size = pool_size
        self.records = list(records)
        self.neighbours = neighbours
        self.matrix = _multi_hot([r.indices for r in self.records], pool_size)  # (R, N)
        self.sizes = np.array([len(r.indices) for r in self.records], dtype=np.float64)
        self.values = np.array([r.value for r in self.records], dtype=np.float64)

    def distances(self, candidates: Sequence[np.ndarray]) -> np.ndarray:
        """(C, R) L2 distances between the candidates' and the records' multi-hot vectors."""
        cand = _multi_hot(candidates, self.pool_size)  # (C, N)
        overlap = (cand @ self.matrix.T).toarray()  # (C, R)
        size = np.asarray(cand.sum(axis=1)).reshape(-1, 1)
        return np.sqrt(np.maximum(size + self.sizes[None, :] - 2.0 * overlap, 0.0))

    def nearest(self, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record positions, distances, normalised weights) of the M nearest records, nearest first."""
        d = self.distances([candidate])[0]
        order = np.argsort(d, kind="stable")[: self.neighbours]
        return order, d[order], self._weights(d[order])

    @staticmethod
    def _weights(d: np.ndarray) -> np.ndarray:
        exact = d <= 1e-9
        w = exact.astype(np.float64) if exact.any() else 1.0 / d
        return w / w.sum()

    def estimate_many(self, candidates: Sequence[np.ndarray]) -> np.ndarray:
        d = self.distances(candidates)  # (C, R)
        m = min(self.neighbours, d.shape[1])
        near = np.argsort(d, axis=1, kind="stable")[:, :m]  # (C, M)
        out = np.empty(len(d))
        for c in range(len(d)):
            out[c] = float(self._weights(d[c, near[c]]) @ self.values[near[c]])
        return out


class RidgeSurrogate:
    """Ridge regression of the record value on a batch design vector, in kernel form.

    kind "indicator": the design is the multi-hot vector (kernel = overlaps); kind "features": the sum of
    the batch's rows of `features` (N, F). Design vectors are centred over the records, the target by its
    mean; the penalty is the one of `alphas` with the lowest closed-form leave-one-out squared error.
    """

    def __init__(
        self,
        pool_size: int,
        records: Sequence[Record],
        *,
        kind: str = "indicator",
        features: np.ndarray | None = None,
        alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0),
    ) -> None:
        if kind not in ("indicator", "features"):
            raise ValueError(f"kind must be 'indicator' or 'features', found {kind!r}")
        if kind == "features" and (features is None or len(features) != pool_size):
            raise ValueError(f"kind 'features' needs a ({pool_size}, F) feature matrix")
        if len(records) < 2:
            raise ValueError(f"a ridge surrogate needs at least 2 records, found {len(records)}")
        self.name = f"ridge_{kind}"
        self.kind = kind
        self.pool_size = pool_size
        self.features = None if features is None else np.asarray(features, dtype=np.float64)
        self.train = self._design([r.indices for r in records])
        y = np.array([r.value for r in records], dtype=np.float64)
        self.y_mean = float(y.mean())
        k = self._kernel(self.train)  # (R, R) uncentred
        self.k_row_mean = k.mean(axis=1)
        self.k_mean = float(k.mean())
        kc = k - self.k_row_mean[:, None] - self.k_row_mean[None, :] + self.k_mean
        best = (math.inf, alphas[0])
        for alpha in alphas:
            inv = np.linalg.inv(kc + alpha * np.eye(len(kc)))
            hat = kc @ inv
            resid = (y - self.y_mean - hat @ (y - self.y_mean)) / np.maximum(1.0 - np.diag(hat), 1e-9)
            best = min(best, (float((resid**2).mean()), alpha))
        self.alpha = best[1]
        self.dual = np.linalg.solve(kc + self.alpha * np.eye(len(kc)), y - self.y_mean)

    def _design(self, candidates: Sequence[np.ndarray]) -> sp.csr_matrix | np.ndarray:
        hot = _multi_hot(candidates, self.pool_size)
        if self.kind == "indicator":
            return hot
        return np.asarray(hot @ self.features)  # (C, F)

    def _kernel(self, design: sp.csr_matrix | np.ndarray) -> np.ndarray:
        k = design @ self.train.T
        return np.asarray(k.toarray() if sp.issparse(k) else k, dtype=np.float64)

    def estimate_many(self, candidates: Sequence[np.ndarray]) -> np.ndarray:
        k = self._kernel(self._design(candidates))  # (C, R)
        kc = k - k.mean(axis=1, keepdims=True) - self.k_row_mean[None, :] + self.k_mean
        return self.y_mean + kc @ self.dual


def spearman(estimated: np.ndarray, actual: np.ndarray) -> float:
    """Spearman ρ; NaN when either side is constant or there are fewer than 3 values."""
    if len(actual) < 3 or np.ptp(estimated) == 0 or np.ptp(actual) == 0:
        return math.nan
    return float(spearmanr(estimated, actual).statistic)


def fidelity(estimator: Estimator, held_out: Sequence[Record]) -> float:
    """Spearman ρ between the estimates and the measured values of `held_out` records."""
    est = estimator.estimate_many([r.indices for r in held_out])
    return spearman(est, np.array([r.value for r in held_out]))


def leave_one_out_fidelity(pool_size: int, records: Sequence[Record], *, neighbours: int = 4) -> float:
    """Spearman ρ of each record's look-up-table estimate from all the other records against its value."""
    rs = list(records)
    est = [
        estimate(LookupTable(pool_size, rs[:i] + rs[i + 1 :], neighbours=neighbours), r.indices)
        for i, r in enumerate(rs)
    ]
    return spearman(np.array(est), np.array([r.value for r in records]))


EstimatorFactory = Callable[[Sequence[Record]], Estimator]


def candidate_estimators(
    pool_size: int, *, neighbours: int = 4, features: np.ndarray | None = None
) -> dict[str, EstimatorFactory]:
    """Builders of every estimator kind applicable here (features only when given)."""
    out: dict[str, EstimatorFactory] = {
        "lut": lambda rs: LookupTable(pool_size, rs, neighbours=neighbours),
        "ridge_indicator": lambda rs: RidgeSurrogate(pool_size, rs, kind="indicator"),
    }
    if features is not None:
        out["ridge_features"] = lambda rs: RidgeSurrogate(pool_size, rs, kind="features", features=features)
    return out


def best_estimator(
    pool_size: int,
    records: Sequence[Record],
    rng: np.random.Generator,
    *,
    neighbours: int = 4,
    features: np.ndarray | None = None,
    held_out_fraction: float = 0.25,
) -> tuple[Estimator, dict[str, float]]:
    """The estimator with the highest held-out Spearman ρ, refitted on all records, and every ρ.

    With fewer than 8 records there is nothing meaningful to hold out: the look-up table is returned and the
    report holds NaN.
    """
    records = list(records)
    factories = candidate_estimators(pool_size, neighbours=neighbours, features=features)
    if len(records) < 8:
        return factories["lut"](records), {name: math.nan for name in factories}
    order = rng.permutation(len(records))
    cut = max(3, round(held_out_fraction * len(records)))
    test = [records[i] for i in order[:cut]]
    train = [records[i] for i in order[cut:]]
    report = {name: fidelity(make(train), test) for name, make in factories.items()}
    best = max(report, key=lambda name: -math.inf if math.isnan(report[name]) else report[name])
    return factories[best](records), report


# --- record generation --------------------------------------------------------------------------------


def random_batches(pool_size: int, budget: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` uniformly random batches of `budget` distinct indices."""
    return [np.sort(rng.choice(pool_size, size=budget, replace=False)) for _ in range(count)]


def swapped_batches(
    base: np.ndarray,
    pool_size: int,
    count: int,
    rng: np.random.Generator,
    *,
    fraction: tuple[float, float] = (0.05, 0.2),
) -> list[np.ndarray]:
    """`count` neighbours of `base`: a fraction in `fraction` of its images swapped for images outside it
    (at least one swapped)."""
    base = np.unique(np.asarray(base, dtype=np.int64))
    outside = np.setdiff1d(np.arange(pool_size), base)
    out = []
    for _ in range(count):
        k = round(rng.uniform(*fraction) * len(base))
        k = max(1, min(k, len(base), len(outside)))
        keep = rng.choice(len(base), size=len(base) - k, replace=False)
        new = rng.choice(outside, size=k, replace=False)
        out.append(np.sort(np.concatenate([base[keep], new])))
    return out


def policy_batches(
    controller: Controller,
    features: np.ndarray,
    budget: int,
    count: int,
    *,
    temperature: float = 2.0,
    seed: int = 0,
) -> list[np.ndarray]:
    """`count` batches sampled from the controller at a raised `temperature` (records near the policy)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    with torch.no_grad():
        rollout = controller.sample(x, budget, count, generator=gen, temperature=temperature)
    return [np.sort(row) for row in rollout.selected.numpy()]


def specs(batches: Sequence[np.ndarray], source: str, *, seed: int = 0) -> list[RecordSpec]:
    """Record specs for batches, all with proxy seed `seed`: common random numbers, so two records of a
    round differ by their batch and not by the proxy's training noise (measured on BCCD to be as large
    as the batch effect itself)."""
    return [RecordSpec(tuple(int(i) for i in b), seed, source) for b in batches]


# --- persistence --------------------------------------------------------------------------------------


def save_records(path: Path, pool_size: int, records: Sequence[Record]) -> None:
    """Write records as JSON atomically (temporary file + rename)."""
    payload = {
        "pool_size": pool_size,
        "records": [{"indices": r.indices.tolist(), "value": r.value, "source": r.source} for r in records],
    }
    with atomic_open(path, "w") as fh:
        json.dump(payload, fh)


def load_records(path: Path) -> tuple[int, list[Record]]:
    """(pool_size, records) from `save_records`' file; raises DataError naming the file when malformed."""
    try:
        payload = json.loads(Path(path).read_text())
        records = [Record(np.asarray(r["indices"]), float(r["value"]), str(r.get("source", "")))
                   for r in payload["records"]]
        return int(payload["pool_size"]), records
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"look-up table {path}: expected JSON with pool_size and records ({exc})") from exc
