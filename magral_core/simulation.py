"""The active-learning protocol as bookkeeping over injected functions.

For each strategy and seed: draw an initial random labeled set from the pool (the same for every strategy
under one seed), then per round train the learner on the labeled set, evaluate it on the learner's own test
split, hand the strategy a `Pool` of the unlabeled images' features and move its first `budget` picks into
the labeled set. Round r's record holds the metrics of the model trained on that round's labeled set and
the batch chosen after it.

The test split is kept out of selection by construction: strategies receive a `Pool` built by
`Learner.pool` from pool images only, and a `StrategyFactory` receives a `RoundContext` (pool features and
the learner's `proxy`, which sees labeled and pool images) with no handle on `Learner.evaluate`.

Every finished round is written as JSON atomically (`RoundStore`), so a killed run resumes where it stopped.
`summarise`/`markdown_table`/`labels_to_reach` are pure; `write_reports` writes JSON, CSV, Markdown and a PNG.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from magral_core.strategies import MagralSettings, Pool, Strategy, fit_magral, make_strategy


@dataclass(frozen=True)
class Metrics:
    """Test metrics of one trained model: COCO mAP@[.5:.95], AP50 and AP per class name."""

    map: float
    ap50: float
    per_class_ap: dict[str, float] = field(default_factory=dict)


ProxyFn = Callable[[np.ndarray, int], float]
"""`proxy(batch, seed) -> mAP`: batch = positions in the round's Pool, trained with them unlabeled."""


class Learner(Protocol):
    """What the protocol needs from a detector (or a toy). Indices are positions in the learner's pool
    (the images that may be labeled); the test split is the learner's own business."""

    @property
    def pool_size(self) -> int: ...

    def train(self, labeled: np.ndarray, *, seed: int) -> Any:
        """Train on the labeled pool images; returns an opaque model state."""
        ...

    def evaluate(self, state: Any) -> Metrics:
        """Metrics of `state` on the test split."""
        ...

    def pool(self, state: Any, unlabeled: np.ndarray, labeled: np.ndarray) -> Pool:
        """Features of the `unlabeled` images (Pool position k = unlabeled[k]) and labeled embeddings."""
        ...

    def proxy(self, state: Any, labeled: np.ndarray, unlabeled: np.ndarray) -> ProxyFn | None:
        """The semi-supervised proxy for MAGRAL's look-up table, or None when the learner has none."""
        ...


@dataclass(frozen=True)
class RoundContext:
    """What a strategy factory may use to build a round's strategy (no test data)."""

    round: int
    seed: int
    budget: int
    labeled: np.ndarray
    unlabeled: np.ndarray
    pool: Pool
    proxy: ProxyFn | None


StrategyFactory = Callable[[str, RoundContext], Strategy]


def make_factory(magral: MagralSettings | None = None) -> StrategyFactory:
    """Baselines by name; "magral" fitted each round on the round's proxy with `fit_magral(magral)`."""
    settings = magral or MagralSettings()

    def factory(name: str, context: RoundContext) -> Strategy:
        if name != "magral":
            return make_strategy(name)
        if context.proxy is None:
            raise ValueError("strategy 'magral' needs a learner with a proxy")
        assert context.pool.features is not None
        strategy, _ = fit_magral(context.pool.features, context.budget, context.proxy, settings,
                                 seed=context.seed)
        return strategy

    return factory


default_factory = make_factory()


@dataclass(frozen=True)
class SimulationSettings:
    """The protocol: initial random labeled images, images added per round, rounds after the initial one."""

    initial: int = 20
    budget: int = 10
    rounds: int = 5
    strategies: tuple[str, ...] = ("random",)
    seeds: tuple[int, ...] = (0,)


@dataclass
class RoundRecord:
    """One trained model of one curve. `times` are seconds per component (train, evaluate, features,
    fit_strategy, select); `seconds` is their sum."""

    strategy: str
    seed: int
    round: int
    n_labeled: int
    map: float
    ap50: float
    per_class_ap: dict[str, float]
    seconds: float
    times: dict[str, float]
    labeled: list[int]
    selected: list[int]

    @staticmethod
    def from_dict(data: dict[str, Any]) -> RoundRecord:
        return RoundRecord(**data)


class RoundStore:
    """`<root>/<strategy>/seed<seed>/round<r>.json`, each written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, strategy: str, seed: int, round_: int) -> Path:
        return self.root / strategy / f"seed{seed}" / f"round{round_:03d}.json"

    def load(self, strategy: str, seed: int, round_: int) -> RoundRecord | None:
        path = self.path(strategy, seed, round_)
        return RoundRecord.from_dict(json.loads(path.read_text())) if path.is_file() else None

    def save(self, record: RoundRecord) -> None:
        write_atomic(self.path(record.strategy, record.seed, record.round), json.dumps(asdict(record)))


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def initial_labeled(pool_size: int, initial: int, seed: int) -> np.ndarray:
    """The seed's initial random labeled set (sorted pool indices), shared by every strategy."""
    if not 0 < initial <= pool_size:
        raise ValueError(f"initial labeled set must be within [1, {pool_size}], found {initial}")
    return np.sort(np.random.default_rng(seed).choice(pool_size, size=initial, replace=False))


def run_curve(
    learner: Learner,
    strategy_name: str,
    seed: int,
    settings: SimulationSettings,
    *,
    factory: StrategyFactory = default_factory,
    store: RoundStore | None = None,
    log: Callable[[RoundRecord], None] | None = None,
    shared: dict[int, _Trained] | None = None,
) -> list[RoundRecord]:
    """One active-learning curve (rounds 0..settings.rounds); finished rounds in `store` are reused.

    `shared` maps a seed to its round-0 model, metrics and pool: round 0 is the same for every strategy
    (same initial set, same training seed), so `run_simulation` trains and evaluates it once per seed.
    """
    labeled = initial_labeled(learner.pool_size, settings.initial, seed)
    records = []
    for r in range(settings.rounds + 1):
        done = store.load(strategy_name, seed, r) if store else None
        if done is None:
            done = _round(learner, strategy_name, seed, r, labeled, settings, factory,
                          shared if r == 0 else None)
            if store:
                store.save(done)
            if log:
                log(done)
        records.append(done)
        labeled = np.union1d(np.asarray(done.labeled, dtype=np.int64), np.asarray(done.selected, np.int64))
    return records


def _round(
    learner: Learner,
    strategy_name: str,
    seed: int,
    r: int,
    labeled: np.ndarray,
    settings: SimulationSettings,
    factory: StrategyFactory,
    shared: dict[int, _Trained] | None,
) -> RoundRecord:
    unlabeled = np.setdiff1d(np.arange(learner.pool_size), labeled)
    want_pool = r < settings.rounds and len(unlabeled) > 0
    trained = shared.get(seed) if shared is not None else None
    if trained is None:
        trained = _train(learner, labeled, unlabeled, seed * 1000 + r, want_pool)
        if shared is not None:
            shared[seed] = trained
    state, metrics, pool, times = trained.state, trained.metrics, trained.pool, dict(trained.times)
    selected: list[int] = []
    if pool is not None:
        if len(pool) != len(unlabeled):
            raise ValueError(f"learner returned a pool of {len(pool)} images for {len(unlabeled)} unlabeled")
        t = time.perf_counter()
        context = RoundContext(r, seed * 1000 + r, settings.budget, labeled, unlabeled, pool,
                               learner.proxy(state, labeled, unlabeled))
        strategy = factory(strategy_name, context)
        times["fit_strategy"] = time.perf_counter() - t
        t = time.perf_counter()
        batch = min(settings.budget, len(unlabeled))
        picks = strategy.rank(pool, batch, np.random.default_rng([seed, r]))
        times["select"] = time.perf_counter() - t
        selected = [int(unlabeled[p.index]) for p in picks[:batch]]
    return RoundRecord(
        strategy=strategy_name, seed=seed, round=r, n_labeled=len(labeled), map=metrics.map,
        ap50=metrics.ap50, per_class_ap=dict(metrics.per_class_ap),
        seconds=sum(times.values()), times=times,
        labeled=[int(i) for i in labeled], selected=selected,
    )


@dataclass(frozen=True)
class _Trained:
    """A model trained on one labeled set: its state, test metrics, pool features and their times."""

    state: Any
    metrics: Metrics
    pool: Pool | None
    times: dict[str, float]


def _train(learner: Learner, labeled: np.ndarray, unlabeled: np.ndarray, seed: int, want_pool: bool
           ) -> _Trained:
    times: dict[str, float] = {}
    t = time.perf_counter()
    state = learner.train(labeled, seed=seed)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = learner.evaluate(state)
    times["evaluate"] = time.perf_counter() - t
    pool = None
    if want_pool:
        t = time.perf_counter()
        pool = learner.pool(state, unlabeled, labeled)
        times["features"] = time.perf_counter() - t
    return _Trained(state, metrics, pool, times)


def run_simulation(
    learner: Learner,
    settings: SimulationSettings,
    *,
    factory: StrategyFactory = default_factory,
    store: RoundStore | None = None,
    log: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """Every strategy × seed curve, in that order."""
    out: list[RoundRecord] = []
    shared: dict[int, _Trained] = {}
    for name in settings.strategies:
        for seed in settings.seeds:
            out += run_curve(learner, name, seed, settings, factory=factory, store=store, log=log,
                             shared=shared)
    return out


# --- reports ------------------------------------------------------------------------------------------


def summarise(records: Sequence[RoundRecord]) -> dict[str, dict[int, dict[str, float]]]:
    """{strategy: {round: {n_labeled, map_mean, map_std, ap50_mean, ap50_std, seeds}}} (std over seeds,
    population std, 0 for one seed)."""
    grouped: dict[str, dict[int, list[RoundRecord]]] = {}
    for rec in records:
        grouped.setdefault(rec.strategy, {}).setdefault(rec.round, []).append(rec)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, rounds in grouped.items():
        out[name] = {}
        for r, recs in sorted(rounds.items()):
            maps = np.array([x.map for x in recs])
            ap50 = np.array([x.ap50 for x in recs])
            out[name][r] = {
                "n_labeled": float(np.mean([x.n_labeled for x in recs])),
                "map_mean": float(maps.mean()), "map_std": float(maps.std()),
                "ap50_mean": float(ap50.mean()), "ap50_std": float(ap50.std()),
                "seeds": float(len(recs)),
            }
    return out


def labels_to_reach(records: Sequence[RoundRecord], target: float) -> dict[str, dict[int, int | None]]:
    """{strategy: {seed: fewest labeled images whose test mAP >= target, or None if never reached}}."""
    out: dict[str, dict[int, int | None]] = {}
    for rec in sorted(records, key=lambda x: (x.strategy, x.seed, x.round)):
        per_seed = out.setdefault(rec.strategy, {})
        if per_seed.get(rec.seed) is None:
            per_seed[rec.seed] = rec.n_labeled if rec.map >= target else None
    return out


def markdown_table(summary: dict[str, dict[int, dict[str, float]]], *, metric: str = "map") -> str:
    """Rows = rounds (with the labeled count), columns = strategies, cells = mean ± std × 100."""
    names = sorted(summary)
    rounds = sorted({r for s in summary.values() for r in s})
    lines = ["| round | labeled | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rounds:
        labeled = next(int(summary[n][r]["n_labeled"]) for n in names if r in summary[n])
        cells = [
            f"{100 * summary[n][r][metric + '_mean']:.2f} ± {100 * summary[n][r][metric + '_std']:.2f}"
            if r in summary[n] else "" for n in names
        ]
        lines.append(f"| {r} | {labeled} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(
    out: Path, records: Sequence[RoundRecord], *, full_pool: Metrics | None = None
) -> list[Path]:
    """results.json, results.csv, summary.md and curve.png in `out`; returns their paths."""
    out = Path(out)
    summary = summarise(records)
    target = 0.95 * full_pool.map if full_pool else math.nan
    reach = labels_to_reach(records, target) if full_pool else {}
    payload = {
        "records": [asdict(r) for r in records], "summary": summary,
        "full_pool": asdict(full_pool) if full_pool else None, "labels_to_95pct_full_pool": reach,
    }
    write_atomic(out / "results.json", json.dumps(payload, indent=1))

    classes = sorted({c for r in records for c in r.per_class_ap})
    rows: list[list[object]] = [["strategy", "seed", "round", "n_labeled", "map", "ap50", "seconds",
             *(f"ap_{c}" for c in classes), *(f"t_{k}" for k in ("train", "evaluate", "features",
                                                                   "fit_strategy", "select"))]]
    for r in records:
        rows.append([r.strategy, r.seed, r.round, r.n_labeled, f"{r.map:.5f}", f"{r.ap50:.5f}",
                     f"{r.seconds:.3f}", *(f"{r.per_class_ap.get(c, math.nan):.5f}" for c in classes),
                     *(f"{r.times.get(k, 0.0):.3f}" for k in ("train", "evaluate", "features", "fit_strategy",
                                                               "select"))])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)

    text = "# Active-learning curves\n\nTest mAP@[.5:.95] × 100, mean ± std over seeds.\n\n"
    text += markdown_table(summary) + "\nTest AP50 × 100.\n\n" + markdown_table(summary, metric="ap50")
    if full_pool:
        text += f"\nFull-pool model: mAP {100 * full_pool.map:.2f}, AP50 {100 * full_pool.ap50:.2f}.\n"
        text += "\nLabeled images to reach 95% of the full-pool mAP (per seed; — = not reached):\n\n"
        for name, seeds in sorted(reach.items()):
            text += f"- {name}: " + ", ".join(f"seed {s}: {v if v is not None else '—'}"
                                               for s, v in sorted(seeds.items())) + "\n"
    write_atomic(out / "summary.md", text)
    plot_curves(out / "curve.png", summary, full_pool)
    return [out / "results.json", out / "results.csv", out / "summary.md", out / "curve.png"]


def plot_curves(
    path: Path, summary: dict[str, dict[int, dict[str, float]]], full_pool: Metrics | None
) -> None:
    """mAP against labeled images, one line per strategy with a ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rounds in sorted(summary.items()):
        xs = np.array([v["n_labeled"] for v in rounds.values()])
        mean = np.array([v["map_mean"] for v in rounds.values()])
        std = np.array([v["map_std"] for v in rounds.values()])
        ax.plot(xs, mean, marker="o", label=name)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    if full_pool:
        ax.axhline(full_pool.map, color="k", linestyle="--", label="full pool")
        ax.axhline(0.95 * full_pool.map, color="gray", linestyle=":", label="95% of full pool")
    ax.set_xlabel("labeled images")
    ax.set_ylabel("test mAP@[.5:.95]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- a deterministic toy learner ----------------------------------------------------------------------


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

    def train(self, labeled: np.ndarray, *, seed: int) -> ToyState:
        return ToyState(self.counts[np.asarray(labeled, dtype=np.int64)].sum(0), seed)

    def _ap(self, evidence: np.ndarray, seed: int, noise: float) -> np.ndarray:
        jitter = np.random.default_rng(seed).uniform(-noise, noise, size=len(evidence))
        return np.clip(0.9 * (1.0 - np.exp(-evidence / self.tau)) + jitter, 0.0, 1.0)

    def evaluate(self, state: ToyState) -> Metrics:
        ap = self._ap(state.evidence, state.seed, 0.005)
        return Metrics(float(0.6 * ap.mean()), float(ap.mean()),
                       {c: float(0.6 * a) for c, a in zip(self.class_names, ap, strict=True)})

    def pool(self, state: ToyState, unlabeled: np.ndarray, labeled: np.ndarray) -> Pool:
        from magral_core.structures import Detections

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
