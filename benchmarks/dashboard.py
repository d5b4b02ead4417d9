"""Dashboard benchmark: how long `/status` takes to render as HTML for a large project.

    python -m benchmarks.dashboard [--rounds 50] [--tasks 10000] [--repeats 30]

Builds a store under a temporary directory with one project of `--rounds` published versions (synthetic
metrics.json with per-stage seconds, and a synthetic ranking.json of `--tasks` unlabeled tasks for each
version) and asks the real app (`backend.app.create_app`, no Redis, Flask test client) for `/status` with a
browser's Accept header. Prints the process's first request (imports, template compilation, forecast fit),
the median and maximum of the repeats after it (forecast and next tasks cached per version, as between two
publishes), the median with the cache emptied (as right after a publish), and the curve PNG's first render.
Goal: median < 200 ms. Wall times depend on what else runs on the machine: the load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.app import create_app
from backend.predictions import Predictor
from backend.services import Services
from magral_core.atomic import write_json
from magral_core.config import Config
from magral_core.service.staging import save_metrics, save_ranking
from magral_core.service.steps import StudioClient
from magral_core.service.store import ModelStore, version_name

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
STAGES = ("fetching", "training", "evaluating", "scoring", "lookup_table", "ranking", "pushing")


def build_store(root: Path, *, project: int, rounds: int, tasks: int, seed: int = 0) -> ModelStore:
    """A store with `rounds` versions of `project` on a made-up saturating curve, each ranking `tasks`."""
    rng = np.random.default_rng(seed)
    store = ModelStore(root)
    for number in range(1, rounds + 1):
        version = version_name(project, number)
        staging = store.begin(project, version)
        labeled = 20 * number
        value = 0.6 - 2.0 * labeled**-0.6 + rng.normal(0, 0.005)
        save_metrics(
            staging,
            {
                "map": value,
                "ap50": min(1.0, value + 0.25),
                "per_class_ap": {"RBC": value, "WBC": value, "Platelets": value},
                "version": version,
                "strategy": "magral" if labeled >= 20 else "entropy_max",
                "class_names": ["RBC", "WBC", "Platelets"],
                "n_labeled": labeled,
                "n_validation": labeled // 5,
                "n_unlabeled": tasks,
                "lut_records": 24,
                "skipped": {"image_errors": 0, "dropped_boxes": 0},
                "stage_seconds": {s: float(rng.uniform(1, 100)) for s in STAGES},
                "duration_s": float(rng.uniform(300, 900)),
            },
        )
        order = rng.permutation(tasks)
        save_ranking(
            staging,
            {
                "version": version,
                "strategy": "magral",
                "task_ids": [int(t) + 1000 for t in order],
                "scores": list(np.arange(tasks) / max(1, tasks - 1)),
                "priorities": sorted(rng.random(tasks).tolist(), reverse=True),
                "prediction_threshold": 0.3,
                "boxes": rng.integers(0, 30, tasks).tolist(),
                "best_scores": rng.random(tasks).round(4).tolist(),
                "uncertainties": rng.random(tasks).round(4).tolist(),
            },
        )
        store.publish(project, staging, version)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        config = Config.from_env({}, home=home, label_studio_url="http://127.0.0.1:8080")
        started = time.perf_counter()
        store = build_store(home / "projects", project=1, rounds=args.rounds, tasks=args.tasks)
        built = time.perf_counter() - started
        print(f"store: {args.rounds} rounds, {args.tasks} tasks each, built in {built:.1f} s")

        def no_client(project: int) -> StudioClient:
            raise AssertionError("the page never calls Label Studio")

        services = Services(store, None, no_client, Predictor(store, config, client_for=no_client))
        app = create_app(config, services=services)
        client = app.test_client()

        def timed(path: str) -> tuple[float, int, int]:
            start = time.perf_counter()
            response = client.get(path, headers=BROWSER)
            elapsed = time.perf_counter() - start
            return elapsed * 1000, response.status_code, len(response.get_data())

        first, code, size = timed("/status")
        assert code == 200, code
        repeats = [timed("/status")[0] for _ in range(args.repeats)]
        uncached = []
        for _ in range(5):  # as after a publish: nothing cached for the new version, imports already done
            app.extensions.pop("magral_version_cache", None)
            uncached.append(timed("/status")[0])
        png_ms, png_code, png_size = timed("/projects/1/curve.png")
        assert png_code == 200, png_code
        print(f"/status HTML ({size / 1024:.0f} KiB): first {first:.1f} ms; median "
              f"{statistics.median(repeats):.1f} ms, max {max(repeats):.1f} ms over {args.repeats} repeats "
              "(goal median < 200 ms)")
        print(f"/status HTML with nothing cached (as after a publish): median "
              f"{statistics.median(uncached):.1f} ms over 5")
        cached_png = timed("/projects/1/curve.png")[0]
        print(f"/projects/1/curve.png ({png_size / 1024:.0f} KiB): first render {png_ms:.1f} ms; "
              f"cached {cached_png:.1f} ms")
        if args.json:
            figures = {
                "command": "python -m benchmarks.dashboard " + " ".join(sys.argv[1:]),
                "rounds": args.rounds, "tasks": args.tasks, "repeats": args.repeats,
                "load_average": os.getloadavg()[0],
                "status_html_ms": {"first": first, "median": statistics.median(repeats), "max": max(repeats),
                                   "uncached_median": statistics.median(uncached)},
                "curve_png_ms": {"first": png_ms, "cached": cached_png},
                "goal_median_ms": 200,
            }
            write_json(args.json, figures)
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
