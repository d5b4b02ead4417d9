"""How a round's work spreads over workers.

    python -m benchmarks.scale scoring [--images N] [--side PX] [--chunk N] [--redis-url URL] [--json PATH]

`scoring`: the pool-scoring stage of a round (after training) on N synthetic images (default 2,000;
seeded, `--side` px squares of coloured rectangles and discs on a gradient, JPEG), scored by the real rq
path: the round's staging directory as `stages.prepare` leaves it for a pool larger than one chunk (the
configured detector, `MAGRAL_DETECTOR`, built with its pretrained weights and trained 2 epochs on 16 other
synthetic images, as a round's `train_detector_step` trains it), its scoring jobs
(`jobs.score_chunk`, enqueued by `RoundQueue.enqueue_chunks`, `--chunk` images each, default
`MAGRAL_SCORING_CHUNK`) drained by 1 and then by 2 `magral worker --burst` processes with one torch thread
each (`MAGRAL_THREADS=1`), then the fan-in's merge (`stages.score_pool`) in this process. Printed per worker
count: the jobs' span (first job's start to last job's end), the wall seconds including the workers' start,
the merge; and the speed-up of the span, 1 worker over 2. The two merged pools are checked to be equal.

Redis: `--redis-url` (default redis://127.0.0.1:6379/14), a database that must be empty when the run starts
(the run refuses one holding keys) and is emptied (FLUSHDB) when it ends. Everything else lives in a temporary
directory. Other configuration comes from the environment (MAGRAL_*). Wall times depend on what else runs on
the machine: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

PROJECT = 1
PYTHON_MAIN = "import sys; from magral_core.cli import main; sys.exit(main())"
CLASS_NAMES = ("box", "disc")
TRAIN_IMAGES = 16
TRAIN_EPOCHS = 2
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"


# --- synthetic images ------------------------------------------------------------------------------------
def synthetic_image(rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An RGB (side, side, 3) uint8 image of 1-6 filled shapes on a gradient, with their xyxy boxes and
    labels (0: rectangle, 1: disc)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side  # (side, side)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    tilt = rng.uniform(-60, 60, 3).astype(np.float32)
    image = base + tilt * (x[..., None] * 0.6 + y[..., None] * 0.4)  # (side, side, 3)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 7))):
        w, h = (int(v) for v in rng.integers(side // 12, side // 3, 2))
        x0, y0 = int(rng.integers(0, side - w)), int(rng.integers(0, side - h))
        label = int(rng.integers(0, 2))
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if label == 0:
            image[y0:y0 + h, x0:x0 + w] = colour
        else:
            inside = ((x * side - x0 - w / 2) / (w / 2)) ** 2 + ((y * side - y0 - h / 2) / (h / 2)) ** 2 <= 1
            image[inside] = colour
        boxes.append([x0, y0, x0 + w, y0 + h])
        labels.append(label)
    return (np.clip(image, 0, 255).astype(np.uint8), np.array(boxes, np.float32).reshape(-1, 4),
            np.array(labels, np.int64))


def write_images(directory: Path, count: int, side: int, seed: int, first_id: int) -> Any:
    """`count` synthetic JPEG images in `directory`, as a DetectionDataset with their boxes."""
    from PIL import Image

    from magral_core.structures import AnnotatedImage, DetectionDataset

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        pixels, boxes, labels = synthetic_image(rng, side)
        path = directory / f"img{first_id + i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        images.append(AnnotatedImage(first_id + i, str(path), side, side, boxes, labels))
    return DetectionDataset(directory, CLASS_NAMES, tuple(images))


# --- the staging directory a round's prepare stage leaves -----------------------------------------------
def prepare_staging(home: Path, config: Any, pool: Any, train: Any, chunk: int) -> tuple[Path, int]:
    """A staging directory with the trained detector, the image sets, the labeled outputs and a plan whose
    pool is left to `chunk`-image scoring jobs; returns it and the number of chunks."""
    from magral_core.service import bindings
    from magral_core.service import staging as files
    from magral_core.service.store import ModelStore
    from magral_core.studio.label_config import LabelConfig

    store = ModelStore(home / "projects")
    version = store.reserve_version(PROJECT)
    staging = store.begin(PROJECT, version)
    trained = config.replace(epochs=TRAIN_EPOCHS, schedule="epochs")
    model = bindings.train_detector_step(train, None, trained, lambda stage, fraction: None)
    bindings.save_model_step(model, staging / files.DETECTOR_FILE,
                             {"version": version, "class_names": list(CLASS_NAMES), "project": PROJECT})
    files.save_images(staging / files.IMAGES_FILE, {"train": train, "val": None, "pool": pool})
    labeled_detections, labeled_embeddings = bindings.extract_step(model, train, config)
    files.save_pool(staging / files.LABELED_FILE, labeled_detections, labeled_embeddings,
                    np.zeros((0, labeled_embeddings.shape[1])))
    chunks = len(files.chunk_bounds(len(pool), chunk))
    plan = files.RoundPlan(
        PROJECT, version, CLASS_NAMES, asdict(LabelConfig("label", "image", "image", CLASS_NAMES)),
        "random", 0, tuple(im.image_id for im in train.images), (),
        tuple(files.TaskImage(im.image_id, im.width, im.height) for im in pool.images),
        metrics={"scoring_from": time.time()}, scoring_chunks=chunks, scoring_chunk=chunk,
    )
    plan.save(staging)
    return staging, chunks


# --- one measurement -------------------------------------------------------------------------------------
def run_scoring(env: Mapping[str, str], redis_url: str, prepared: Path, chunks: int, workers: int
                ) -> dict[str, Any]:
    """Score a copy of the `prepared` round's pool with `workers` burst workers, then merge; the figures."""
    from redis import Redis
    from rq.job import Job, JobStatus

    from magral_core.config import Config
    from magral_core.service import bindings, stages
    from magral_core.service import staging as files
    from magral_core.service.queue import RoundQueue

    staging = prepared.parent / f"{prepared.name}-{workers}w"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(prepared, staging)
    connection = Redis.from_url(redis_url)
    coordinator = RoundQueue(connection, queue_name=f"magral-scale-{os.getpid()}-{workers}",
                             round_timeout=3600)
    jobs = coordinator.enqueue_chunks(PROJECT, str(staging), range(chunks))
    worker_env = dict(env) | {"REDIS_URL": redis_url, "MAGRAL_THREADS": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", PYTHON_MAIN, "worker", "--burst", "--queue", coordinator.queue.name]
    start = time.perf_counter()
    processes = [subprocess.Popen(command, env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(workers)]
    errors = [process.communicate(timeout=6 * 3600)[1] for process in processes]
    wall = time.perf_counter() - start
    fetched = [Job.fetch(job.id, connection=connection) for job in jobs]
    failed = [job.id for job in fetched if job.get_status() != JobStatus.FINISHED]
    if failed or any(process.returncode for process in processes):
        tail = b"\n".join(errors).decode(errors="replace")[-2000:]
        raise RuntimeError(f"scoring jobs failed: {failed}; worker exit codes "
                           f"{[p.returncode for p in processes]}\n{tail}")
    span = (max(job.ended_at for job in fetched if job.ended_at)
            - min(job.started_at for job in fetched if job.started_at)).total_seconds()
    per_job = [(job.ended_at - job.started_at).total_seconds() for job in fetched
               if job.started_at and job.ended_at]
    config = Config.from_env(env)
    merge_start = time.perf_counter()
    stages.score_pool(staging, stages.RoundContext(config, bindings.default_steps(), lambda *_: None))
    merge = time.perf_counter() - merge_start
    pool = files.load_pool(staging / files.POOL_FILE)
    return {"workers": workers, "threads_per_worker": 1, "chunks": chunks, "jobs_span_s": round(span, 2),
            "wall_with_worker_start_s": round(wall, 2), "merge_s": round(merge, 3),
            "job_s_mean": round(float(np.mean(per_job)), 2), "job_s_max": round(float(np.max(per_job)), 2),
            "pool": pool, "staging": staging}


def same_pool(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two pool files hold the same detections and embeddings, in the same order."""
    if not np.array_equal(a["embeddings"], b["embeddings"]) or len(a["detections"]) != len(b["detections"]):
        return False
    return all(np.array_equal(x.boxes_xyxy, y.boxes_xyxy) and np.array_equal(x.scores, y.scores)
               and np.array_equal(x.labels, y.labels)
               for x, y in zip(a["detections"], b["detections"], strict=True))


def scoring(args: argparse.Namespace) -> dict[str, Any]:
    """The `scoring` measurement (see the module docstring)."""
    from redis import Redis

    from magral_core.config import Config
    from magral_core.vision.engine import setup_torch

    load_before = [round(v, 2) for v in os.getloadavg()]
    connection = Redis.from_url(args.redis_url)
    if connection.dbsize():
        raise SystemExit(f"expected an empty Redis database at {args.redis_url}, found {connection.dbsize()} "
                         "keys: give another with --redis-url")
    with tempfile.TemporaryDirectory(prefix="magral-scale-") as tmp:
        home = Path(tmp) / "home"
        env = dict(os.environ) | {"MAGRAL_HOME": str(home), "MAGRAL_THREADS": "1", "OMP_NUM_THREADS": "1",
                                  "REDIS_URL": args.redis_url}
        if args.chunk:
            env["MAGRAL_SCORING_CHUNK"] = str(args.chunk)
        config = Config.from_env(env)
        setup_torch(1)
        chunk = -(-config.scoring_chunk // config.batch_size) * config.batch_size  # as `stages.prepare` does
        print(f"scoring: {args.images} synthetic {args.side} px images, {config.detector} at "
              f"{config.image_size} px, chunks of {chunk} ...", flush=True)
        started = time.perf_counter()
        pool = write_images(Path(tmp) / "pool", args.images, args.side, config.seed, 10_000)
        train = write_images(Path(tmp) / "train", TRAIN_IMAGES, args.side, config.seed + 1, 1)
        prepared, chunks = prepare_staging(home, config, pool, train, chunk)
        print(f"    prepared in {time.perf_counter() - started:.1f} s: {chunks} scoring jobs", flush=True)
        if chunks < 2:
            print("    (one job: a second worker has nothing to take; a smaller --chunk spreads the pool)",
                  flush=True)
        runs: dict[int, dict[str, Any]] = {}
        try:
            for workers in (1, 2):
                runs[workers] = run_scoring(env, args.redis_url, prepared, chunks, workers)
                r = runs[workers]
                print(f"    {workers} worker(s) x 1 thread: jobs {r['jobs_span_s']:.1f} s "
                      f"(with worker start {r['wall_with_worker_start_s']:.1f} s, a job "
                      f"{r['job_s_mean']:.1f} s mean, merge {r['merge_s']:.2f} s)", flush=True)
        finally:
            connection.flushdb()
        identical = same_pool(runs[1]["pool"], runs[2]["pool"])
        speedup = runs[1]["jobs_span_s"] / runs[2]["jobs_span_s"]
        print(f"    speed-up 1 -> 2 workers: {speedup:.2f}x; merged pools identical: {identical}; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        if not identical:
            raise SystemExit("the pools scored with 1 and with 2 workers differ")
        return {
            "images": args.images, "side": args.side, "detector": config.detector,
            "image_size": config.image_size, "batch_size": config.batch_size, "chunk": chunk,
            "chunks": chunks, "cores": os.cpu_count(),
            "runs": {str(w): {k: v for k, v in r.items() if k not in ("pool", "staging")}
                     for w, r in runs.items()},
            "speedup": round(speedup, 3), "pools_identical": identical,
            "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("scoring", help="pool scoring with 1 vs 2 workers")
    score.add_argument("--images", metavar="N", type=int, default=2000, help="pool images (default 2000)")
    score.add_argument("--side", metavar="PX", type=int, default=320, help="image side in px (default 320)")
    score.add_argument("--chunk", metavar="N", type=int, default=0,
                       help="images per scoring job (default MAGRAL_SCORING_CHUNK)")
    score.add_argument("--redis-url", metavar="URL", default=DEFAULT_REDIS,
                       help=f"an empty Redis database (default {DEFAULT_REDIS})")
    score.add_argument("--json", metavar="PATH", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.side < 32 or args.chunk < 0:
        parser.error("expected --images >= 1, --side >= 32 and --chunk >= 0")
    results = scoring(args)
    if args.json is not None:
        from magral_core.atomic import write_json

        write_json(args.json, {"command": "scoring", **results})
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
