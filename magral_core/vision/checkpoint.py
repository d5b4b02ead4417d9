"""Self-describing detector checkpoints: weights + how to rebuild the detector + class names + metadata.

File contents (a dict loadable with `torch.load(..., weights_only=True)`):
`format` (FORMAT), `detector` (registry name), `kwargs` (constructor arguments: num_classes, image_size),
`class_names`, `meta` (JSON-like: numbers, strings, lists, dicts) and `state_dict`.
Files are written to a temporary sibling and renamed, so a reader never sees a partial checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magral_core.atomic import atomic_open
from magral_core.errors import UserError
from magral_core.vision.detectors import DETECTORS, build_detector, detector_spec

FORMAT = "magral-detector/1"


def save_checkpoint(path: Path, model: nn.Module, *, meta: Mapping[str, Any],
                    class_names: Sequence[str] | None = None) -> Path:
    """Write `model` (built by `build_detector`) atomically to `path`; returns `path`.

    The class names are `class_names`, or else `meta["class_names"]`. Raises ValueError when they are
    missing or do not match the model's class count, or when `meta` is not JSON-serialisable
    (weights-only loading accepts plain containers only).
    """
    spec = detector_spec(model)
    if class_names is None:
        if "class_names" not in meta:
            raise ValueError("class names missing: pass class_names= or meta['class_names']")
        class_names = list(meta["class_names"])
    if len(class_names) != spec.num_classes:
        raise ValueError(f"model has {spec.num_classes} classes but {len(class_names)} class names were "
                         "given")
    try:
        plain_meta = json.loads(json.dumps(dict(meta), allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint meta must be JSON-serialisable: {exc}") from None
    payload = {
        "format": FORMAT,
        "detector": spec.name,
        "kwargs": {"num_classes": spec.num_classes, "image_size": spec.image_size},
        "class_names": [str(n) for n in class_names],
        "meta": plain_meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict, validated. Raises UserError naming the file when it is missing, not a
    checkpoint, or of another format."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: expected a file written by `magral train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"checkpoint {path} cannot be read as a torch file: {first_line}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"checkpoint {path}: expected format {FORMAT!r}, found {found!r}")
    if payload["detector"] not in DETECTORS:
        raise UserError(f"checkpoint {path}: unknown detector {payload['detector']!r}; "
                        f"registered: {sorted(DETECTORS)}")
    return payload


def load_checkpoint(path: Path, *, weights_dir: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the detector of a checkpoint (no pretrained weights, no network) in eval mode.

    Returns the model and a dict with `detector`, `kwargs`, `class_names` and `meta`. Raises UserError as
    `read_checkpoint` does, or when the weights do not fit the described detector.
    """
    payload = read_checkpoint(path)
    model = build_detector(payload["detector"], **payload["kwargs"],
                           weights_dir=Path(weights_dir or tempfile.gettempdir()), pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path}: weights do not fit detector {payload['detector']!r}: "
                        f"{str(exc).splitlines()[0]}") from None
    model.eval()
    info = {k: payload[k] for k in ("detector", "kwargs", "class_names", "meta")}
    return model, info
