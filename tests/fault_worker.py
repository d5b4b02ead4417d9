"""A real `magral worker` process for the fault tests (`python tests/fault_worker.py <root> <redis url>`):
the worker entry's own loop (`serve.work_forever`: reconnection, reaper) with the fake Label Studio of
service_fixtures kept in files under `<root>` (so the test process sees what was pushed) and the toy steps.

With MAGRAL_FAULT_GATE=<stage> ("prepare", "scoring", "records", "propose", "finish") the round blocks at
that stage ("scoring": in a job scoring a chunk of the pool):
it writes `<root>/reached-<stage><tag>` and waits until `<root>/release<tag>` exists (never, for a kill);
`<tag>` is MAGRAL_FAULT_TAG (default empty). The
"finish" gate is in the push to Label Studio, after the version is published.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_fixtures import (
    LABEL_CONFIG,
    FakeAnnotation,
    FakeStudio,
    FakeTask,
    ToyStrategy,
    box,
    toy_config,
    toy_steps,
)

LABELED = (1, 2, 3)
UNLABELED = (4, 5, 6, 7, 8, 9)


def gate(root: Path, stage: str) -> None:
    if os.environ.get("MAGRAL_FAULT_GATE") != stage:
        return
    tag = os.environ.get("MAGRAL_FAULT_TAG", "")
    (root / f"reached-{stage}{tag}").write_text(str(os.getpid()))  # the work horse (its own process group)
    while not (root / f"release{tag}").exists():
        time.sleep(0.05)


class FileStudio(FakeStudio):
    """The fake Label Studio with what the backend pushed appended to JSON-lines files."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "ls", LABEL_CONFIG)
        self.home = root
        for t in LABELED:
            url = f"/data/upload/1/img{t}.png"
            annotation = FakeAnnotation(100 + t, (box(10, 10, 50, 50, "RBC"),))
            self.tasks.append(FakeTask(t, url, (annotation,), {"image": url}))
        for t in UNLABELED:
            url = f"/data/upload/1/img{t}.png"
            self.tasks.append(FakeTask(t, url, (), {"image": url}))

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        gate(self.home, "finish")
        with open(self.home / "imported.jsonl", "a") as out:
            for p in predictions:
                out.write(json.dumps({"task": p["task"], "model_version": p["model_version"]}) + "\n")
        return len(predictions)

    def serve_in_ranked_order(self, project_id: int, model_version: str) -> None:
        with open(self.home / "served.jsonl", "a") as out:
            out.write(json.dumps(model_version) + "\n")


def make_images(root: Path) -> None:
    """The task images (written once, by the test, before any worker starts)."""
    studio = FakeStudio(root / "ls")
    for t in (*LABELED, *UNLABELED):
        studio.add_task(t)


def read_lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def worker_config(root: Path, redis_url: str) -> Any:
    """MAGRAL for the pool (3 labeled >= 1), the pool scored in 3 chunk jobs, 2 + 2 records: every stage of
    a round runs."""
    return toy_config(root / "home", redis_url=redis_url, min_labeled_for_magral=1, lut_records=4,
                      min_new_annotations=1, scoring_chunk=2, batch_size=2)


def gated_steps(root: Path) -> Any:
    steps = toy_steps()

    def train(dataset: Any, previous: Any, config: Any, progress: Any, val: Any) -> Any:
        gate(root, "prepare")
        return steps.train(dataset, previous, config, progress, val)

    def extract(model: Any, dataset: Any, config: Any) -> Any:
        if {image.image_id for image in dataset.images} <= set(UNLABELED):  # a chunk of the pool
            gate(root, "scoring")
        return steps.extract(model, dataset, config)

    class GatedStrategy(ToyStrategy):
        def record(self, staging: Path, index: int) -> Mapping[str, Any]:
            gate(root, "records")
            return super().record(staging, index)

        def propose(self, staging: Path, records: Sequence[Mapping[str, Any]]) -> int:
            gate(root, "propose")
            return super().propose(staging, records)

    return replace(steps, train=train, extract=extract, strategy=GatedStrategy)


def main() -> None:
    import logging

    import magral_core.service.jobs  # imported before the fork, as `magral worker` does
    import magral_core.vision.engine  # noqa: F401  (torch, before the fork)
    from magral_core.cli import serve
    from magral_core.service import context
    from magral_core.service.queue import QUEUE_NAME

    root, redis_url = Path(sys.argv[1]), sys.argv[2]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = worker_config(root, redis_url)
    studio = FileStudio(root)
    steps = gated_steps(root)
    context.install(context.WorkerContext(config, client_factory=lambda c, s, p: studio,
                                          steps_factory=lambda: steps))
    serve.work_forever(config, QUEUE_NAME)


if __name__ == "__main__":
    main()
