"""Label Studio at scale through the project's own client (`studio.client.LabelStudioClient`): listing every
task, pushing one prediction per task, reading the model versions and deleting a version's predictions.

    python -m benchmarks.scale_studio --sizes 1000 10000 --json docs/results/scale_studio.json

Label Studio 1.23.2 is installed and run by `scripts/labelstudio.sh` (`install`, then `run DATA_DIR PORT` in a
process group of its own, on 127.0.0.1, in a temporary data directory; the whole group is stopped at the
end); MAGRAL_LS_VENV / MAGRAL_LS_TEMPLATE point the script at an existing install. `--url URL --token KEY`
uses a running Label Studio instead (its server RSS is then not measured).

Per size N: a project of N tasks, imported as JSON, `--import-batch` tasks per request (each task's image
a URL string: no image is fetched here). The client is `LabelStudioClient.from_config` of the environment's
config, so MAGRAL_STUDIO_PAGE_SIZE (tasks per listing request) and MAGRAL_PREDICTION_CHUNK (predictions
per import request) apply. Measured, in this order:

- `iter_tasks` streamed (each record dropped at once) and `list_tasks` (every record kept): seconds, the
  Python heap's peak (tracemalloc, a separate pass so it does not slow the timed one) and the process's
  RSS growth (VmHWM, reset before the pass, minus VmRSS before it). Bounded memory means the streamed
  peak stays the same from 1,000 to 10,000 tasks;
- `import_predictions` of N predictions of version v1 (`--boxes` rectangles each, as `studio.results`
  writes them): predictions per second, the client's CPU seconds, the created count against N, RSS growth
  and the seconds of each chunk request; then of v2 under tracemalloc: the heap's peak while pushing (the
  N prediction dicts are built before and not counted);
- `model_versions` (seconds, the counts), then `delete_predictions` keeping v2: seconds and the deleted
  count against N.

Label Studio's server RSS (VmRSS summed over its process group, sampled every 0.25 s) is recorded per
phase (its peak) when this module started it. The 1-minute load average is recorded per size.

Kept as one module because it is one benchmark command whose measurements share one Label Studio server,
its memory sampler and one client.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import requests

from benchmarks.scale_features import reset_peak, rss_mib
from magral_core.config import Config
from magral_core.studio.client import LabelStudioClient, LabelStudioError

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "labelstudio.sh"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # the script's default legacy token
CLASSES = ("RBC", "WBC", "Platelets")
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                + "".join(f'<Label value="{c}"/>' for c in CLASSES) + "</RectangleLabels></View>")


def group_rss_mib(pgid: int) -> float:
    """VmRSS (MiB) summed over the processes of process group `pgid`."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(entry.path, "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:  # field 5, after "pid (comm) state ppid"
                continue
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


class ServerMemory:
    """Samples a process group's RSS every `interval` s in a thread; `peak()` returns and resets the peak."""

    def __init__(self, pgid: int | None, interval: float = 0.25) -> None:
        self.pgid, self._peak, self._stop = pgid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        if pgid is not None:
            self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._peak = max(self._peak, group_rss_mib(self.pgid or 0))

    def peak(self) -> float | None:
        if self.pgid is None:
            return None
        value, self._peak = max(self._peak, group_rss_mib(self.pgid)), 0.0
        return value

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def label_studio(port: int) -> Iterator[tuple[str, int]]:
    """(URL, process group id) of Label Studio started by `scripts/labelstudio.sh`; stopped on exit."""
    keep = ("MAGRAL_LS_VENV", "MAGRAL_LS_TEMPLATE", "PYTHON")
    env = {k: v for k, v in os.environ.items()
           if k in keep or not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "MAGRAL_", "DJANGO_"))}
    subprocess.run(["bash", str(SCRIPT), "install"], env=env, check=True, timeout=1800)
    with tempfile.TemporaryDirectory(prefix="magral-ls-scale-") as root:
        log = Path(root, "server.log")
        with log.open("wb") as out:
            process = subprocess.Popen(["bash", str(SCRIPT), "run", str(Path(root, "data")), str(port)],
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"Label Studio did not start; log tail:\n{log.read_text()[-3000:]}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield url, process.pid
        finally:
            stop_group(process, timeout=20)


def stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group `process` leads, SIGKILL it after `timeout` s; wait for the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def api(url: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    """One request with the legacy token; the parsed answer. Raises RuntimeError with the body on an error."""
    response = requests.request(method, url + path, headers={"Authorization": f"Token {token}"},
                                timeout=600, **kwargs)
    if response.status_code >= 400:
        raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}")
    return response.json() if response.content else None


def make_project(url: str, token: str, n: int, batch: int) -> tuple[int, float]:
    """(project id, seconds) of a new project with `n` tasks imported `batch` per request."""
    body = {"title": f"scale {n}", "label_config": LABEL_CONFIG}
    project = api(url, token, "POST", "/api/projects", json=body)
    pid = int(project["id"])
    start = time.perf_counter()
    for first in range(0, n, batch):
        tasks = [{"image": f"https://images.invalid/scale/{i:06d}.jpg"}
                 for i in range(first, min(n, first + batch))]
        answer = api(url, token, "POST", f"/api/projects/{pid}/import", json=tasks)
        if answer.get("task_count") != len(tasks):
            raise RuntimeError(f"import of tasks {first}..: expected {len(tasks)}, found {answer}")
    return pid, time.perf_counter() - start


def predictions(task_ids: list[int], version: str, boxes: int) -> list[dict[str, Any]]:
    """One prediction per task with `boxes` rectanglelabels items each, in `studio.results`' shape."""
    out = []
    for t in task_ids:
        result = [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 640,
                   "original_height": 480, "image_rotation": 0,
                   "value": {"x": 5.0 + k, "y": 7.5 + k, "width": 10.25, "height": 12.5, "rotation": 0,
                             "rectanglelabels": [CLASSES[(t + k) % len(CLASSES)]]},
                   "score": round(0.3 + 0.05 * (k % 10), 4)} for k in range(boxes)]
        out.append({"task": t, "result": result, "score": (t % 997) / 997, "model_version": version})
    return out


def measure(fn: Callable[[], T], *, traced: bool = False) -> tuple[T, dict[str, float]]:
    """(fn(), {"s", "client_cpu_s", "rss_growth_mib"} or with `traced` {"heap_peak_mib",
    "heap_retained_mib"}): a timed pass watches time, this process's CPU time and RSS, a traced pass the
    Python heap only (tracemalloc slows allocation); retained = what the heap still holds after it, its
    result included."""
    figures: dict[str, float] = {}
    if traced:
        gc.collect()
        tracemalloc.start()
        result = fn()
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
        figures["heap_peak_mib"], figures["heap_retained_mib"] = peak / 2**20, retained / 2**20
        tracemalloc.stop()
        return result, figures
    before = rss_mib()["rss"]
    can_reset = reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    figures["s"] = time.perf_counter() - start
    figures["client_cpu_s"] = time.process_time() - cpu
    figures["rss_growth_mib"] = rss_mib()["hwm"] - before if can_reset else float("nan")
    return result, figures


@contextlib.contextmanager
def chunk_timer(client: LabelStudioClient) -> Iterator[list[float]]:
    """The seconds of each prediction-chunk request the client sends meanwhile (its `_send_chunk`)."""
    seconds: list[float] = []
    send = client._send_chunk

    def timed(*args: Any, **kwargs: Any) -> int:
        start = time.perf_counter()
        try:
            return send(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    client._send_chunk = timed  # type: ignore[method-assign]
    try:
        yield seconds
    finally:
        del client._send_chunk  # the class's method again


def run_size(client: LabelStudioClient, url: str, token: str, n: int, args: argparse.Namespace,
             server: ServerMemory) -> dict[str, Any]:
    """Every measurement on a new project of `n` tasks."""
    out: dict[str, Any] = {"tasks": n, "page_size": client.page_size,
                           "prediction_chunk": client.predictions_per_request, "boxes": args.boxes,
                           "load_before": os.getloadavg()[0]}
    server.peak()
    pid, out["import_tasks_s"] = make_project(url, token, n, args.import_batch)
    out["server_rss_import_mib"] = server.peak()
    key = "image"

    def stream() -> int:
        return sum(1 for _ in client.iter_tasks(pid, image_key=key))

    count, out["iter_tasks"] = measure(stream)
    out["iter_tasks"].update(measure(stream, traced=True)[1])
    tasks, out["list_tasks"] = measure(lambda: client.list_tasks(pid, image_key=key))
    del tasks
    out["list_tasks"].update(measure(lambda: len(client.list_tasks(pid, image_key=key)), traced=True)[1])
    out["listed"] = count
    out["server_rss_list_mib"] = server.peak()
    ids = sorted(t.id for t in client.iter_tasks(pid, image_key=key))
    first = predictions(ids, "v1", args.boxes)
    with chunk_timer(client) as chunks:
        created, out["push_v1"] = measure(lambda: client.import_predictions(pid, first))
    out["push_v1"].update(created=created, per_s=created / out["push_v1"]["s"], chunk_s=chunks)
    first.clear()
    second = predictions(ids, "v2", args.boxes)  # built before tracing: only the push's own memory counts
    created, out["push_v2_traced"] = measure(lambda: client.import_predictions(pid, second), traced=True)
    out["push_v2_traced"]["created"] = created
    second.clear()
    out["server_rss_push_mib"] = server.peak()
    versions, out["model_versions"] = measure(lambda: client.model_versions(pid))
    out["model_versions"]["counts"] = versions
    start = time.perf_counter()
    try:
        deleted, out["delete"] = measure(lambda: client.delete_predictions(pid, {"v2"}))
        out["delete"]["deleted"] = deleted
    except LabelStudioError as exc:  # a figure too: what the service's announce step would meet
        out["delete"] = {"s": time.perf_counter() - start, "deleted": None, "error": str(exc)[:300]}
    out["after_delete"] = client.model_versions(pid)
    out["server_rss_delete_mib"] = server.peak()
    out["load_after"] = os.getloadavg()[0]
    return out


def report(r: dict[str, Any]) -> str:
    """The figures of one size, as printed."""
    it, lt, p1, p2 = r["iter_tasks"], r["list_tasks"], r["push_v1"], r["push_v2_traced"]
    server = "" if r["server_rss_import_mib"] is None else (
        f"\n  Label Studio RSS peak: import {r['server_rss_import_mib']:.0f} MiB, listing "
        f"{r['server_rss_list_mib']:.0f}, pushing {r['server_rss_push_mib']:.0f}, deleting "
        f"{r['server_rss_delete_mib']:.0f}")
    return (
        f"N={r['tasks']} page={r['page_size']} chunk={r['prediction_chunk']} boxes={r['boxes']} "
        f"load {r['load_before']:.2f}->{r['load_after']:.2f}; tasks imported in {r['import_tasks_s']:.1f} s\n"
        f"  iter_tasks: {r['listed']} tasks in {it['s']:.2f} s ({r['listed'] / it['s']:.0f}/s, client CPU "
        f"{it['client_cpu_s']:.2f} s), heap peak {it['heap_peak_mib']:.2f} MiB (retained "
        f"{it['heap_retained_mib']:.2f}), RSS growth {it['rss_growth_mib']:.1f} MiB\n"
        f"  list_tasks: {lt['s']:.2f} s, heap peak {lt['heap_peak_mib']:.2f} MiB, RSS growth "
        f"{lt['rss_growth_mib']:.1f} MiB\n"
        f"  import_predictions: {p1['created']}/{r['tasks']} created in {p1['s']:.2f} s = "
        f"{p1['per_s']:.0f}/s (client CPU {p1['client_cpu_s']:.2f} s), RSS growth "
        f"{p1['rss_growth_mib']:.1f} MiB; chunk requests {p1['chunk_s'][0]:.2f} s first, "
        f"{p1['chunk_s'][-1]:.2f} s last; second version {p2['created']}/{r['tasks']}, heap peak "
        f"{p2['heap_peak_mib']:.2f} MiB\n"
        f"  model_versions {r['model_versions']['s']:.3f} s {r['model_versions']['counts']}; "
        f"delete_predictions {r['delete']['deleted']}/{r['tasks']} in {r['delete']['s']:.2f} s "
        f"{r['delete'].get('error', '')}; "
        f"left {r['after_delete']}"
        + server)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="tasks per project")
    parser.add_argument("--import-batch", type=int, default=1000, help="tasks per import request")
    parser.add_argument("--boxes", type=int, default=10, help="rectangles per prediction (default 10)")
    parser.add_argument("--port", type=int, default=0, help="Label Studio's port (default: a free one)")
    parser.add_argument("--url", help="a running Label Studio (not started or stopped here)")
    parser.add_argument("--token", default=TOKEN, help="its legacy token or personal access token")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.url:
            url, pgid = args.url.rstrip("/"), None
        else:
            url, pgid = stack.enter_context(label_studio(args.port or free_port()))
        server = ServerMemory(pgid)
        stack.callback(server.stop)
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="magral-scale-home-")))
        client = LabelStudioClient.from_config(Config.from_env(home=home), url=url, api_key=args.token)
        results = []
        for n in args.sizes:
            results.append(run_size(client, url, args.token, n, args, server))
            print(report(results[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": " ".join(["python -m benchmarks.scale_studio", *sys.argv[1:]]),
                   "label_studio": "1.23.2", "cpus": os.cpu_count(), "results": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
