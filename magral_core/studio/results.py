"""From a strategy's ranking and a detector's boxes to what Label Studio stores: scores and result items.

Pure. Label Studio's "Uncertainty sampling" serves the task with the LOWEST prediction score first, so the
task a strategy ranks best gets score 0 and the worst gets 1, spaced evenly by rank (ranks, not the raw
priorities, so the order survives whatever scale a strategy's priorities have).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from magral_core import boxes
from magral_core.structures import Detections
from magral_core.studio.label_config import LabelConfig


def scores_from_order(order: Sequence[int], n: int) -> np.ndarray:
    """Score per pool position given `order` (pool positions, best first): the best gets 0.0, the last 1.0.

    `order` must be a permutation of range(n); raises ValueError naming what it found otherwise.
    Returns (n,) float64 in [0, 1].
    """
    order_array = np.asarray(order, dtype=np.int64).reshape(-1)
    if len(order_array) != n or (n and not np.array_equal(np.sort(order_array), np.arange(n))):
        raise ValueError(
            f"expected a ranking covering all {n} pool positions once, found {len(order_array)} "
            "positions with repeats or gaps"
        )
    scores = np.zeros(n, dtype=np.float64)
    if n > 1:
        scores[order_array] = np.arange(n, dtype=np.float64) / (n - 1)
    return scores


def detections_to_results(
    detections: Detections,
    *,
    width: int,
    height: int,
    class_names: Sequence[str],
    config: LabelConfig,
    threshold: float,
) -> list[dict[str, Any]]:
    """Label Studio `rectanglelabels` result items for one image's detections.

    Boxes below `threshold` and boxes whose class is not a label of `config` (a label removed from the
    config) are left out. `width`/`height` are the image's original pixel size; boxes are written in percent.
    """
    allowed = set(config.labels)
    keep = np.flatnonzero(np.asarray(detections.scores) >= threshold)
    clipped = boxes.clip_boxes_xyxy(np.asarray(detections.boxes_xyxy)[keep], width, height)
    keep = keep[clipped.keep]
    percent = boxes.xyxy_to_labelstudio_percent(clipped.boxes[clipped.keep], width, height)
    items: list[dict[str, Any]] = []
    for row, i in zip(percent, keep, strict=True):
        label = int(detections.labels[i])
        if not 0 <= label < len(class_names) or class_names[label] not in allowed:
            continue
        x, y, w, h = (round(float(v), 4) for v in row)
        items.append(
            {
                "from_name": config.from_name,
                "to_name": config.to_name,
                "type": "rectanglelabels",
                "original_width": int(width),
                "original_height": int(height),
                "image_rotation": 0,
                "value": {
                    "x": x,
                    "y": y,
                    "width": w,
                    "height": h,
                    "rotation": 0,
                    "rectanglelabels": [class_names[label]],
                },
                "score": round(float(detections.scores[i]), 4),
            }
        )
    return items


def restrict_to_config(result: Sequence[Mapping[str, Any]], config: LabelConfig) -> list[dict[str, Any]]:
    """Result items re-addressed to `config`'s control and image, keeping only labels the config still has
    (Label Studio silently drops a prediction with an unknown label)."""
    allowed = set(config.labels)
    kept = []
    for item in result:
        labels = item.get("value", {}).get("rectanglelabels") or []
        if labels and labels[0] in allowed:
            kept.append({**item, "from_name": config.from_name, "to_name": config.to_name})
    return kept


def task_prediction(
    task_id: int, result: Sequence[Mapping[str, Any]], score: float, model_version: str
) -> dict[str, Any]:
    """One prediction as `import_predictions` and `/predict` want it."""
    return {
        "task": int(task_id),
        "result": list(result),
        "score": float(score),
        "model_version": model_version,
    }
