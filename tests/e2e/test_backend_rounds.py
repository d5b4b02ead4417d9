"""The whole loop against a real Label Studio: `magral serve` connected as the ML backend, annotations made
in Label Studio, "Start training" → a round → Label Studio serves the round's first pick next. The first
round has too few labels for MAGRAL and ranks with the fallback strategy; after one more label the second
round is MAGRAL's and publishes the next version. Toy sizes (small images, one epoch, two look-up-table
records, a few policy episodes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from magral_core.service.store import ModelStore, version_number

from .conftest import (
    TOY_ROUNDS,
    Backend,
    StudioServer,
    annotate,
    create_project,
    running_backend,
    train_and_wait,
)

pytestmark = pytest.mark.e2e

N_LABELED = 12  # annotated before the first round: one short of MAGRAL_MIN_LABELED


@pytest.fixture(scope="module")
def backend(label_studio: StudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """`magral serve` configured for toy rounds that start from "Start training" only."""
    settings = TOY_ROUNDS | {
        "MAGRAL_MIN_LABELED": str(N_LABELED + 1),
        "MAGRAL_MIN_NEW_ANNOTATIONS": "1000",
    }
    with running_backend(label_studio, tmp_path_factory.mktemp("magral-home"), settings) as running:
        yield running


def _next_task(server: StudioServer, project: int) -> int:
    return int(server.api("GET", f"/api/projects/{project}/next/").json()["id"])


def test_rounds_drive_what_label_studio_serves(
    label_studio: StudioServer, backend: Backend, bccd_images: tuple[Path, ...], bccd_coco: Any
) -> None:
    started = time.monotonic()
    project = create_project(label_studio, "bccd magral rounds", bccd_images)
    ml = label_studio.api(
        "POST", "/api/ml", json={"url": backend.url, "project": project.id, "title": "MAGRAL"}
    ).json()
    for task_id in project.task_ids[:N_LABELED]:
        annotate(label_studio, task_id, bccd_coco)
    store = ModelStore(backend.home / "projects")

    first = train_and_wait(label_studio, backend, project.id, int(ml["id"]), None)
    first_done = time.monotonic()
    ranking = store.load_ranking(project.id, first)
    assert ranking.strategy == "entropy_max"  # the default fallback below MAGRAL_MIN_LABELED
    unlabeled = set(project.task_ids[N_LABELED:])
    assert set(ranking.task_ids) == unlabeled
    details = label_studio.api("GET", f"/api/projects/{project.id}/").json()
    assert (details["sampling"], details["model_version"]) == ("Uncertainty sampling", first)
    assert _next_task(label_studio, project.id) == ranking.task_ids[0]

    # Label MAGRAL's pick, train again: the next version ranks the rest and Label Studio follows it.
    annotate(label_studio, ranking.task_ids[0], bccd_coco)
    second = train_and_wait(label_studio, backend, project.id, int(ml["id"]), first)
    assert version_number(second) == version_number(first) + 1
    second_ranking = store.load_ranking(project.id, second)
    assert second_ranking.strategy == "magral"
    assert set(second_ranking.task_ids) == unlabeled - {ranking.task_ids[0]}
    details = label_studio.api("GET", f"/api/projects/{project.id}/").json()
    assert details["model_version"] == second
    assert _next_task(label_studio, project.id) == second_ranking.task_ids[0]
    print(f"\nrounds: first {first_done - started:.0f} s, second {time.monotonic() - first_done:.0f} s")
