"""Label Studio webhook bodies → events the queue understands (pure; bodies as recorded against LS 1.23).

Bodies are read defensively: `project` may be an object with `id` or a bare id; `ANNOTATIONS_CREATED`
carries a LIST under `annotation`; `ANNOTATIONS_DELETED` lists ids under `annotations`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.errors import ApiError
from magral_core.studio.label_config import LabelConfigError, parse_label_config, select_rectangles

ANNOTATION_ACTIONS = (
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATIONS_DELETED",
)
KNOWN_ACTIONS = (*ANNOTATION_ACTIONS, "START_TRAINING", "TASKS_CREATED")


@dataclass(frozen=True)
class Event:
    """What a webhook means for the queue.

    `kind`: "annotations" (count changed annotations), "training" (START_TRAINING), "tasks" (score new
    tasks) or "ignored" (`reason` says why). `warnings` note input that was accepted but partly ignored.
    """

    action: str
    kind: str
    project: int | None = None
    count: int = 0
    task_ids: tuple[int, ...] = ()
    reason: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)


def project_id(value: Any) -> int | None:
    """A project id from `{"id": 2}`, `2`, `"2"` or Label Studio's `/setup` form `"2.1795606833"`."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        return int(head) if head.isdigit() else None
    return None


def parse_event(body: Any) -> Event:
    """Validate a webhook body. Raises ApiError(400) saying what was expected and what was found."""
    if not isinstance(body, Mapping):
        raise ApiError(400, f"expected a JSON object with an 'action', found {type(body).__name__}")
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise ApiError(400, f"expected a string 'action' (e.g. ANNOTATION_CREATED), found {action!r}")
    if action not in KNOWN_ACTIONS:
        return Event(action, "ignored", reason=f"action {action} does not concern training")
    project = project_id(body.get("project"))
    if project is None:
        task = body.get("task")
        project = project_id(task.get("project")) if isinstance(task, Mapping) else None
    if project is None:
        raise ApiError(
            400,
            f"expected 'project' with an integer 'id' in a {action} webhook, "
            f"found {body.get('project')!r:.80}",
        )
    if action == "START_TRAINING":
        return Event(action, "training", project)
    if action == "TASKS_CREATED":
        return _tasks_event(action, project, body.get("tasks"))
    if action == "ANNOTATIONS_DELETED":
        items = body.get("annotations")
        if not isinstance(items, list):
            raise ApiError(400, f"expected a list 'annotations' in {action}, found {type(items).__name__}")
        return Event(action, "annotations", project, count=len(items))
    return _annotations_event(action, project, body)


def _tasks_event(action: str, project: int, tasks: Any) -> Event:
    if not isinstance(tasks, list):
        raise ApiError(400, f"expected a list 'tasks' in {action}, found {type(tasks).__name__}")
    ids = []
    for task in tasks:
        task_id = task.get("id") if isinstance(task, Mapping) else None
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise ApiError(
                400, f"expected every task in {action} to have an integer 'id', found {task!r:.80}"
            )
        ids.append(task_id)
    return Event(action, "tasks", project, task_ids=tuple(ids))


def _annotations_event(action: str, project: int, body: Mapping[str, Any]) -> Event:
    raw = body.get("annotation")
    candidates: list[Any] = raw if isinstance(raw, list) else [raw]
    annotations: list[Mapping[str, Any]] = [a for a in candidates if isinstance(a, Mapping)]
    if not annotations or len(annotations) != len(candidates):
        raise ApiError(
            400,
            f"expected 'annotation' to be an object (or a list of them for "
            f"ANNOTATIONS_CREATED) in {action}, found {raw!r:.80}",
        )
    kept = [a for a in annotations if not a.get("was_cancelled")]
    if not kept:
        return Event(
            action, "ignored", project, reason="cancelled (skipped) annotation: nothing to learn from"
        )
    for a in kept:
        if not isinstance(a.get("result", []), list):
            raise ApiError(
                400, f"expected 'annotation.result' to be a list, found {type(a['result']).__name__}"
            )
    return Event(action, "annotations", project, count=len(kept), warnings=_label_warnings(body, kept))


def _label_warnings(body: Mapping[str, Any], annotations: list[Mapping[str, Any]]) -> tuple[str, ...]:
    """Boxes whose label the project's config does not know, or annotations without boxes (kept as images
    with no objects): reported back, never an error."""
    project = body.get("project")
    xml = project.get("label_config") if isinstance(project, Mapping) else None
    warnings = []
    if any(not a.get("result") for a in annotations):
        warnings.append("an annotation has no regions: the image is learned as containing no objects")
    if not isinstance(xml, str):
        return tuple(warnings)
    try:
        config = parse_label_config(xml)
    except LabelConfigError as exc:
        return (*warnings, f"project label config unusable: {exc}")
    for a in annotations:
        unknown = select_rectangles(a.get("result") or [], config, config.labels).unknown
        for name, count in sorted(unknown.items()):
            warnings.append(
                f"{count} box(es) with label {name!r} ignored: expected one of {', '.join(config.labels)}"
            )
    return tuple(warnings)
