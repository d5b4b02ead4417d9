"""Rounds of a Label Studio project of 10,000 tasks on this machine: the time of each stage, `/predict`
latency while a round runs, the worker's peak memory, the store's size.

    python -m benchmarks.scale_round [--tasks 10000] [--labeled 40] [--rounds 2] [--side 160]
        [--redis-url redis://127.0.0.1:6379/12] [--json docs/results/scale_round.json]

Label Studio 1.23.2 is started as `benchmarks.scale_studio` starts it. `--tasks` synthetic images
(`benchmarks.scale.synthetic_image`, `--side` px JPEG) are served by a local HTTP server that the backend
may fetch from (`MAGRAL_ALLOWED_IMAGE_HOSTS`); the tasks are imported 1,000 per request, the first
`--labeled` with their true boxes as annotations. The backend runs as a user runs it: `magral serve` (web
only, `REDIS_URL` set) and one `magral worker`, both with the environment's configuration (MAGRAL_*) and
one torch thread each; it is connected as the project's ML backend and each round starts from "Start
training" (`POST /api/ml/{id}/train`). After a round, its first `--budget` picks (default
`MAGRAL_BUDGET`) are annotated with their true boxes before the next round starts.

Measured per round: its stage seconds (`stage_seconds` of the published version's metrics: fetching,
training, evaluating, scoring, caching, look-up table, ranking, pushing, ...), its wall time from the
press to the version being served; the tasks it ranked (`candidates` in its metrics, `method.candidates`);
`/predict` latency for one task at a time while the round runs, every `--probe-every` s, on tasks the served
version scored (an annotator opening a task Label Studio serves) and, every tenth probe, on a task it did not
score (the detector runs in the request; before any version is served every answer is the empty
"untrained" one); the worker's peak RSS (VmHWM of the worker and of the job
processes it forks, sampled every 0.5 s); Label Studio's next task against the version's best-ranked one.
At the end: the store's bytes per task and Redis's memory.

The Redis database must be empty when the run starts (the run refuses one holding keys) and is emptied
(FLUSHDB) at the end. Everything else lives in a temporary directory.

Kept as one module because it is one benchmark command whose measurements share one Label Studio, one image
server, one backend and its worker.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import requests

from benchmarks.scale import synthetic_image
from benchmarks.scale_studio import api, free_port, label_studio, stop_group

REPO = Path(__file__).resolve().parents[1]
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # scripts/labelstudio.sh's default legacy token
MAIN = "import sys; from magral_core.cli import main; sys.exit(main())"
CLASSES = ("box", "disc")
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                + "".join(f'<Label value="{c}"/>' for c in CLASSES) + "</RectangleLabels></View>")
ROUND_TIMEOUT = 3600.0


def box_results(boxes: np.ndarray, labels: np.ndarray, side: int) -> list[dict[str, Any]]:
    """Label Studio rectangle results (percent of the image) of xyxy pixel `boxes`."""
    return [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": side,
             "original_height": side,
             "value": {"x": 100 * float(b[0]) / side, "y": 100 * float(b[1]) / side,
                       "width": 100 * float(b[2] - b[0]) / side, "height": 100 * float(b[3] - b[1]) / side,
                       "rotation": 0, "rectanglelabels": [CLASSES[int(c)]]}}
            for b, c in zip(boxes, labels, strict=True)]


def write_images(directory: Path, count: int, side: int, seed: int) -> list[list[dict[str, Any]]]:
    """`count` JPEG images `000000.jpg`.. in `directory`; their true boxes as Label Studio results."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = []
    for i in range(count):
        pixels, boxes, labels = synthetic_image(rng, side)
        Image.fromarray(pixels).save(directory / f"{i:06d}.jpg", quality=90)
        truth.append(box_results(boxes, labels, side))
    return truth


@contextlib.contextmanager
def image_server(directory: Path) -> Iterator[str]:
    """Base URL of an HTTP server of `directory` on 127.0.0.1 (a thread; stopped on exit)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return None

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def make_project(url: str, token: str, images: str, truth: list[list[dict[str, Any]]], labeled: int
                 ) -> tuple[int, list[int], float]:
    """(project id, task ids in image order, seconds) of a new project of one task per image, the first
    `labeled` annotated with their true boxes."""
    project = api(url, token, "POST", "/api/projects", json={"title": f"round {len(truth)}",
                                                               "label_config": LABEL_CONFIG})
    pid = int(project["id"])
    start = time.perf_counter()
    for first in range(0, len(truth), 1000):
        tasks = [{"data": {"image": f"{images}/{i:06d}.jpg"},
                  **({"annotations": [{"result": truth[i]}]} if i < labeled else {})}
                 for i in range(first, min(len(truth), first + 1000))]
        answer = api(url, token, "POST", f"/api/projects/{pid}/import", json=tasks)
        if answer.get("task_count") != len(tasks):
            raise RuntimeError(f"import of tasks {first}..: expected {len(tasks)}, found {answer}")
    seconds = time.perf_counter() - start
    ids: dict[str, int] = {}
    page = 1
    while True:
        listed = api(url, token, "GET", f"/api/tasks/?project={pid}&page={page}&page_size=1000")
        for task in listed["tasks"]:
            ids[str(task["data"]["image"]).rsplit("/", 1)[-1]] = int(task["id"])
        if len(ids) >= len(truth) or not listed["tasks"]:
            break
        page += 1
    return pid, [ids[f"{i:06d}.jpg"] for i in range(len(truth))], seconds


class WorkerMemory:
    """Peak VmHWM (MiB) of process `pid` and its descendants, sampled every `interval` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        threading.Thread(target=self._loop, args=(interval,), daemon=True).start()

    def _family(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        family, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            family.append(p)
            todo += children.get(p, [])
        return family

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for p in self._family():
                with contextlib.suppress(OSError, ValueError):
                    for line in Path(f"/proc/{p}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def stop(self) -> None:
        self._stop.set()


class Probe:
    """`/predict` for one task every `every` s in a thread: latencies (ms) of `scored` tasks, and of an
    `unscored` one every tenth probe."""

    def __init__(self, backend: str, project: int, images: str, scored: list[tuple[int, int]],
                 unscored: list[tuple[int, int]], every: float) -> None:
        self.latencies: dict[str, list[float]] = {"scored": [], "unscored": []}
        self.failures = 0
        self._stop = threading.Event()
        self._args = (backend, project, images, scored, unscored, every)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        backend, project, images, scored, unscored, every = self._args
        session = requests.Session()
        n = 0
        while not self._stop.wait(every):
            kind, pool = ("unscored", unscored) if n % 10 == 9 and unscored else ("scored", scored)
            if not pool:
                kind, pool = "unscored", unscored
            task, image = pool[n % len(pool)]
            n += 1
            body = {"tasks": [{"id": task, "data": {"image": f"{images}/{image:06d}.jpg"}, "annotations": [],
                               "predictions": [], "project": project}],
                    "project": f"{project}.1", "label_config": LABEL_CONFIG, "params": {}}
            start = time.perf_counter()
            try:
                answer = session.post(f"{backend}/predict", json=body, timeout=30)
                ok = answer.status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                self.latencies[kind].append(1000 * (time.perf_counter() - start))
            else:
                self.failures += 1

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=60)
        out: dict[str, Any] = {"failures": self.failures}
        for kind, values in self.latencies.items():
            ordered = sorted(values)
            out[kind] = {"requests": len(values)} | ({
                "p50_ms": statistics.median(ordered),
                "p99_ms": ordered[min(len(ordered) - 1, int(np.ceil(0.99 * len(ordered))) - 1)],
                "max_ms": ordered[-1]} if ordered else {})
        return out


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{url} exited; log tail:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    sys.exit(f"{url} did not answer within {timeout:.0f} s; log tail:\n{log.read_text()[-3000:]}")


def status(backend: str, project: int) -> dict[str, Any]:
    answer = requests.get(f"{backend}/status", params={"project": project}, timeout=30)
    answer.raise_for_status()
    projects = answer.json()["projects"]
    return dict(projects[0]) if projects else {}


def run_round(studio: str, backend: str, project: int, ml: int, previous: str | None, probe: Probe,
              memory: WorkerMemory) -> tuple[str, float]:
    """Press "Start training" and wait for a new served version; (version, seconds)."""
    before = status(backend, project).get("last_error")
    memory.peak = 0.0
    start = time.perf_counter()
    api(studio, TOKEN, "POST", f"/api/ml/{ml}/train", json={})
    deadline = time.monotonic() + ROUND_TIMEOUT
    while time.monotonic() < deadline:
        current = status(backend, project)
        version = current.get("current_version")
        if version and version != previous and not current.get("running"):
            return str(version), time.perf_counter() - start
        if current.get("last_error") not in (None, before):
            raise RuntimeError(f"round failed: {current['last_error']}")
        time.sleep(2)
    raise RuntimeError(f"no new version within {ROUND_TIMEOUT:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--labeled", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget", type=int, default=None, help="picks annotated after a round")
    parser.add_argument("--side", type=int, default=160, help="image side in px (default 160)")
    parser.add_argument("--probe-every", type=float, default=0.25, help="seconds between /predict probes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    import redis

    from magral_core.config import Config
    from magral_core.service.store import ModelStore

    db = redis.Redis.from_url(args.redis_url)
    if db.dbsize():
        sys.exit(f"{args.redis_url} holds {db.dbsize()} keys; give an empty database")
    budget = args.budget or Config.from_env().budget
    result: dict[str, Any] = {"tasks": args.tasks, "labeled": args.labeled, "side": args.side,
                              "load_before": os.getloadavg()[0], "rounds": []}
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="magral-scale-round-")))
        stack.callback(db.flushdb)
        start = time.perf_counter()
        truth = write_images(root / "images", args.tasks, args.side, args.seed)
        result["images_s"] = time.perf_counter() - start
        images = stack.enter_context(image_server(root / "images"))
        studio, _ = stack.enter_context(label_studio(free_port()))
        project, task_ids, result["import_s"] = make_project(studio, TOKEN, images, truth, args.labeled)
        port = free_port()
        home = root / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "REDIS_"))} | {
            "MAGRAL_HOME": str(home), "MAGRAL_HOST": "127.0.0.1", "MAGRAL_PORT": str(port),
            "LABEL_STUDIO_URL": studio, "LABEL_STUDIO_API_KEY": TOKEN, "REDIS_URL": args.redis_url,
            "MAGRAL_ALLOWED_IMAGE_HOSTS": images.removeprefix("http://"), "MAGRAL_THREADS": "1",
            "OMP_NUM_THREADS": "1", "MAGRAL_MIN_NEW_ANNOTATIONS": "1000000"}
        home.mkdir()
        processes = []
        for name, command in (("serve", "serve"), ("worker", "worker")):
            log = (root / f"{name}.log").open("wb")
            stack.callback(log.close)
            processes.append(subprocess.Popen([sys.executable, "-c", MAIN, command], stdout=log,
                                              stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                              start_new_session=True))
        for p in processes:
            stack.callback(functools.partial(stop_group, p, 30))
        backend = f"http://127.0.0.1:{port}"
        wait_healthy(f"{backend}/health", processes[0], root / "serve.log")
        ml = int(api(studio, TOKEN, "POST", "/api/ml", json={"url": backend, "project": project,
                                                               "title": "MAGRAL"})["id"])
        memory = WorkerMemory(processes[1].pid)
        stack.callback(memory.stop)
        store = ModelStore(home / "projects")
        image_of = {t: i for i, t in enumerate(task_ids)}
        previous: str | None = None
        labeled = set(task_ids[: args.labeled])
        for r in range(args.rounds):
            scored = ([(t, image_of[t]) for t in store.load_ranking(project, previous).task_ids]
                      if previous else [])
            unscored = [(t, image_of[t]) for t in task_ids if t not in labeled and t not in
                        {s for s, _ in scored}][:200]
            probe = Probe(backend, project, images, scored, unscored, args.probe_every)
            load = os.getloadavg()[0]
            try:
                version, seconds = run_round(studio, backend, project, ml, previous, probe, memory)
            except RuntimeError as exc:
                sys.exit(f"round {r}: {exc}\nworker log:\n{(root / 'worker.log').read_text()[-4000:]}")
            predicted = probe.stop()
            metrics = store.load_metrics(project, version)
            ranking = store.load_ranking(project, version)
            next_task = int(api(studio, TOKEN, "GET", f"/api/projects/{project}/next/")["id"])
            row = {"round": r, "version": version, "served_before": previous, "seconds": seconds,
                   "load_before": load, "load_after": os.getloadavg()[0], "strategy": metrics.get("strategy"),
                   "n_labeled": metrics.get("n_labeled"), "ranked": len(ranking.task_ids),
                   "candidates": metrics.get("candidates"), "stage_seconds": metrics.get("stage_seconds"),
                   "worker_peak_rss_mib": memory.peak, "predict_while_running": predicted,
                   "next_task_is_best_ranked": next_task == ranking.task_ids[0], "map": metrics.get("map")}
            result["rounds"].append(row)
            print(json.dumps(row), flush=True)
            for task in ranking.task_ids[:budget]:  # the annotators label the round's picks
                api(studio, TOKEN, "POST", f"/api/tasks/{task}/annotations/",
                    json={"result": truth[image_of[task]]})
                labeled.add(task)
            previous = version
        result["store_bytes_per_task"] = sum(
            f.stat().st_size for f in (home / "projects").rglob("*") if f.is_file()) / args.tasks
        info = db.info("memory")
        result["redis_used_memory_mib"] = int(info["used_memory"]) / 2**20
        result["redis_keys"] = db.dbsize()
    result["load_after"] = os.getloadavg()[0]
    result["command"] = " ".join(["python -m benchmarks.scale_round", *sys.argv[1:]])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
