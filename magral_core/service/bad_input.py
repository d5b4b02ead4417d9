"""Why a task has no boxes: the image errors of a round's tasks, per task and reason, as the round's metrics
keep them (`metrics["bad_input"]`, shown by `/status`). Pure, except `FetchLog`, a pass-through client
that notes the failures of `fetch_image`.

Reasons: "fetch_failed" (unreachable, refused, 404, too slow...), "not_an_image" (does not decode) and
"over_pixel_limit" (the message names MAGRAL_MAX_IMAGE_PIXELS and the limit).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from magral_core.errors import UserError
from magral_core.service.steps import StudioClient

BAD_INPUT_KEPT = 10  # the last tasks kept with their reason in a round's `bad_input`


def input_reason(message: str) -> str:
    """Why a task has no boxes, from its image error: "over_pixel_limit", "not_an_image" or
    "fetch_failed"."""
    lowered = message.lower()
    if "pixels" in lowered:
        return "over_pixel_limit"
    if "decode" in lowered or "expected an image" in lowered or "not an image" in lowered:
        return "not_an_image"
    return "fetch_failed"


def bad_input_summary(failures: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`{"count", "by_reason": {reason: n}, "last": the last BAD_INPUT_KEPT failures}`, each failure
    `{"task", "reason", "message"}`."""
    return {
        "count": len(failures),
        "by_reason": dict(Counter(str(f["reason"]) for f in failures)),
        "last": [dict(f) for f in failures[-BAD_INPUT_KEPT:]],
    }


class FetchLog:
    """A Label Studio client whose `fetch_image` notes, per task, why an image could not be had (the error
    still propagates); every other call passes through."""

    def __init__(self, client: StudioClient) -> None:
        self.client = client
        self.failures: list[dict[str, Any]] = []

    def get_project(self, project_id: int) -> Mapping[str, Any]:
        return self.client.get_project(project_id)

    def list_tasks(self, project_id: int, *, image_key: str | None = None) -> Sequence[Any]:
        return self.client.list_tasks(project_id, image_key=image_key)

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        return self.client.import_predictions(project_id, predictions)

    def serve_in_ranked_order(self, project_id: int, model_version: str) -> None:
        self.client.serve_in_ranked_order(project_id, model_version)

    def fetch_image(self, image: str, *, task_id: int) -> Path:
        try:
            return self.client.fetch_image(image, task_id=task_id)
        except UserError as exc:
            message = str(exc)
            reason = input_reason(message)
            self.failures.append({"task": int(task_id), "reason": reason, "message": message[:300]})
            raise
