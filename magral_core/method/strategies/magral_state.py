"""MAGRAL's fit between its two stages of records, on disk: `save_fit` / `load_fit` of a `MagralFit` (the
controller's tensors through `torch.save`, everything else as JSON text inside the same file, so loading
needs `weights_only=True` only), and look-up-table records to and from their JSON form."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magral_core.atomic import atomic_open
from magral_core.errors import DataError
from magral_core.method.lookup_table import Record, RecordSpec
from magral_core.method.policy import load_state, save_state
from magral_core.method.policy_training import TrainingHistory
from magral_core.method.strategies.magral import MagralFit, MagralReport


def records_from_json(records: Sequence[Mapping[str, Any]]) -> list[Record]:
    """`Record`s from their JSON form ({"indices", "value", "source"}, extra keys ignored)."""
    return [Record(np.asarray(r["indices"], np.int64), float(r["value"]), str(r["source"])) for r in records]


def record_to_json(record: Record) -> dict[str, Any]:
    return {"indices": record.indices.tolist(), "value": record.value, "source": record.source}


def save_fit(path: Path, fit: MagralFit) -> None:
    """Write a `MagralFit` atomically (the controller's tensors, the rest as JSON text)."""
    import torch

    report = fit.report
    rest = {
        "rng": fit.rng.bit_generator.state,
        "pending": [{"indices": list(s.indices), "seed": s.seed, "source": s.source} for s in fit.pending],
        "fidelity": report.fidelity,
        "estimator": report.estimator,
        "records": [record_to_json(r) for r in report.records],
        "history": [h.as_dict() for h in report.history],
    }
    with atomic_open(path, "wb") as handle:
        torch.save({"controller": save_state(fit.controller), "rest": json.dumps(rest)}, handle)


def load_fit(path: Path) -> MagralFit:
    """The `MagralFit` `save_fit` wrote; raises DataError naming the file when it is unreadable."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        rest = json.loads(state["rest"])
        rng = np.random.default_rng()
        rng.bit_generator.state = rest["rng"]
        report = MagralReport(rest["fidelity"], rest["estimator"], records_from_json(rest["records"]),
                              [TrainingHistory(**h) for h in rest["history"]])
        pending = [RecordSpec(tuple(s["indices"]), int(s["seed"]), str(s["source"])) for s in rest["pending"]]
        return MagralFit(load_state(state["controller"]), report, rng, pending)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: expected MAGRAL's saved first stage ({type(exc).__name__}: {exc})") from exc
