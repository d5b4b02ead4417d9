"""Why a task comes next: the served version's ranking with the signals its round stored.

`ranking.json` of a version (written by `service.stages.finish`) holds, in serving order, the task ids, the
Label Studio scores (0 = served first, see `magral_core.studio.results`), the strategy's priorities (higher =
sooner) and per task the boxes shown to annotators, the best box score and the largest class entropy. Versions
written before those signals existed lack them: the rows then carry None.
"""

from __future__ import annotations

from typing import Any

from magral_core.service.staging import load_ranking
from magral_core.service.store import ModelStore

MAX_LIMIT = 1000


def _at(values: Any, index: int) -> Any:
    return values[index] if isinstance(values, list) and index < len(values) else None


def box_note(boxes: int | None, best: float | None, threshold: float | None) -> str:
    """What an annotator sees of the predictions, in words (empty when boxes are shown)."""
    if boxes is None or boxes > 0:
        return ""
    shown = f"no box at or above {threshold:.2f}" if threshold is not None else "no box shown"
    if best is None:
        return f"{shown}: the detector found nothing"
    return f"{shown} (best score {best:.2f}): the image opens without pre-annotations"


def top_tasks(
    store: ModelStore, project: int, version: str, *, limit: int, studio: str | None
) -> dict[str, Any]:
    """The first `limit` tasks `version` serves, with rank (0 = next), score, priority and signals, each
    with a link to the task in Label Studio when its URL (`studio`) is known. Raises StoreError when the
    version or its ranking is missing."""
    data = load_ranking(store.version_dir(project, version))
    task_ids = list(data.get("task_ids", []))
    threshold = data.get("prediction_threshold")
    rows = []
    for i, task in enumerate(task_ids[:limit]):
        boxes, best = _at(data.get("boxes"), i), _at(data.get("best_scores"), i)
        rows.append(
            {
                "rank": i,
                "task": int(task),
                "score": _at(data.get("scores"), i),
                "priority": _at(data.get("priorities"), i),
                "boxes": boxes,
                "best_score": best,
                "uncertainty": _at(data.get("uncertainties"), i),
                "note": box_note(boxes, best, threshold),
                "url": f"{studio}/projects/{project}/data?task={int(task)}" if studio else None,
            }
        )
    return {
        "project": project,
        "version": version,
        "strategy": data.get("strategy"),
        "prediction_threshold": threshold,
        "total": len(task_ids),
        "tasks": rows,
    }


def parse_limit(raw: str | None, default: int = 20) -> int:
    """`?limit=` as an integer in 1..MAX_LIMIT; raises ValueError with the message a client should see."""
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"expected ?limit= an integer from 1 to {MAX_LIMIT}, found {raw!r:.40}")
    return value
