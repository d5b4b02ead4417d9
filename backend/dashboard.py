"""The `/status` page for people: the same data as the JSON, as one server-rendered HTML page.

`project_view` turns a project's status (see `backend.status`) and its rounds' metrics into display rows
(numbers formatted here, so the template only places strings); `render` fills `templates/status.html`
through Flask's `render_template`, which autoescapes everything (labels, error messages and task data come
from users). The page needs no external asset; a few lines of inline script poll the JSON for the running
job's progress and reload the page when a round ends.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from flask import render_template

from backend.status import progress_of
from magral_core.errors import StoreError
from magral_core.service.store import version_number


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "–"


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "–"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def _when(stamp: Any) -> str:
    if not isinstance(stamp, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def round_label(version: str, strategy: Any) -> str:
    """What an annotator reads for a version: `magral-2-v0003` is round 3 of project 2."""
    try:
        number = f"round {version_number(version)}"
    except StoreError:
        return version
    return f"{number} · {strategy}" if strategy else number


# the order a round runs its stages in (metrics.json stores them sorted by name)
STAGE_ORDER = ("fetching", "training", "evaluating", "scoring", "caching", "queued", "lookup_table", "policy",
               "ranking", "pushing")


def stage_names(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every stage any round timed: the known ones in the order a round runs them, then any other."""
    names: set[str] = set()
    for r in rounds:
        stages = r.get("stage_seconds")
        if isinstance(stages, Mapping):
            names.update(stages)
    known = [s for s in STAGE_ORDER if s in names]
    return known + sorted(names - set(known))


def round_rows(rounds: Sequence[Mapping[str, Any]], stages: Sequence[str]) -> list[dict[str, Any]]:
    """Newest first: version, label, labels, mAP, AP50, strategy, duration and one cell per stage."""
    rows = []
    for r in reversed(rounds):
        timed: Mapping[str, Any] = r["stage_seconds"] if isinstance(r.get("stage_seconds"), Mapping) else {}
        rows.append(
            {
                "version": r["version"],
                "label": round_label(r["version"], r.get("strategy")),
                "labels": r.get("n_labeled", "–"),
                "map": _number(r.get("map")),
                "ap50": _number(r.get("ap50")),
                "strategy": r.get("strategy") or "–",
                "duration": _seconds(r.get("duration_s")),
                "stages": [_seconds(timed.get(s)) for s in stages],
                "error": r.get("error"),
            }
        )
    return rows


def forecast_view(forecast: Mapping[str, Any]) -> dict[str, Any]:
    """The forecast's numbers as display strings."""
    band = forecast.get("band")
    reach = forecast.get("labels_to") or {}
    return {
        "message": forecast.get("message", ""),
        "verdict": forecast.get("verdict"),
        "method": forecast.get("method"),
        "horizon": forecast.get("horizon"),
        "expected": _number(forecast.get("expected_map")),
        "band": f"{band[0]:.3f}–{band[1]:.3f}" if band else "",
        "plateau": _number(forecast.get("plateau")),
        "reach": {k: ("–" if v is None else str(v)) for k, v in reach.items()},
        "n_labeled": forecast.get("n_labeled"),
    }


def error_rows(status: Mapping[str, Any], latest: Mapping[str, Any]) -> list[dict[str, str]]:
    """The last failed round or setup, and the tasks the latest round skipped."""
    rows = []
    error = status.get("last_error")
    if isinstance(error, Mapping):
        rows.append({"when": _when(error.get("time")), "stage": str(error.get("stage", "")),
                     "message": str(error.get("message", ""))})
    skipped: Mapping[str, Any] = latest["skipped"] if isinstance(latest.get("skipped"), Mapping) else {}
    if skipped.get("image_errors"):
        rows.append({"when": "", "stage": f"{latest.get('version')} images",
                     "message": f"{skipped['image_errors']} task(s) skipped: their image could not be "
                                "fetched or read (the worker's log names each task)"})
    if skipped.get("dropped_boxes"):
        rows.append({"when": "", "stage": f"{latest.get('version')} annotations",
                     "message": f"{skipped['dropped_boxes']} box(es) dropped: unknown label, empty or "
                                "outside the image"})
    return rows


def ranking_rows(ranking: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The next tasks with their numbers as display strings."""
    rows = []
    for row in (ranking or {}).get("tasks", []):
        rows.append(
            row
            | {
                "score": _number(row.get("score"), 4),
                "priority": _number(row.get("priority"), 4),
                "best_score": _number(row.get("best_score"), 2),
                "uncertainty": _number(row.get("uncertainty"), 3),
                "boxes": "–" if row.get("boxes") is None else row["boxes"],
            }
        )
    return rows


def project_view(
    status: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]], ranking: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Everything the template shows for one project."""
    stages = stage_names(rounds)
    running = status.get("running")
    progress = progress_of(running)
    latest = rounds[-1] if rounds else {}
    current = status.get("current_version")
    return {
        "project": status["project"],
        "current": current,
        "current_label": round_label(current, latest.get("strategy")) if current else "",
        "strategy": latest.get("strategy") or "–",
        "labeled": status.get("labeled") if status.get("labeled") is not None else "–",
        "unlabeled": status.get("unlabeled") if status.get("unlabeled") is not None else "–",
        "pending": status.get("pending_annotations"),
        "stages": stages,
        "rounds": round_rows(rounds, stages),
        "forecast": forecast_view(status.get("forecast") or {}),
        "running": running,
        "progress": {
            "stage": str((progress or {}).get("stage") or (running or {}).get("status") or ""),
            "percent": round(100 * float((progress or {}).get("fraction") or 0.0)),
            "version": (progress or {}).get("version") or (running or {}).get("version") or "",
        },
        "errors": error_rows(status, latest),
        "bad_input": status.get("bad_input") or {},
        "queue_unavailable": status.get("queue_unavailable"),
        "ranking": ranking,
        "next_tasks": ranking_rows(ranking),
    }


def render(projects: Sequence[dict[str, Any]], queue: Mapping[str, Any] | None, *, refresh_s: int) -> str:
    """The whole page."""
    return render_template("status.html", projects=projects, queue=queue, refresh_s=refresh_s)
