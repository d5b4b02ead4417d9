"""What `/status` reports, gathered from the store and the queue: per project its rounds, the running job,
the last error and the label-budget forecast; for the whole backend the queue and its workers.

The JSON shape (`project_status`) is what clients read; the dashboard (`backend.dashboard`) renders the same
data with more of each round's metrics. Forecasts are cached per served version (`VersionCache`): the
versions are immutable, so a version's rounds give the same forecast until the next publish.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backend.curve_plot import render_curve_png
from backend.services import Services
from backend.task_ranking import top_tasks
from magral_core.config import Config
from magral_core.errors import StoreError
from magral_core.method.forecast import forecast
from magral_core.service.store import ModelStore

log = logging.getLogger(__name__)
ROUND_KEYS = ("map", "ap50", "n_labeled", "n_unlabeled", "strategy")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
QUEUE_UNAVAILABLE = "the job queue (Redis) is unreachable: shown from the model store alone"


class VersionCache:
    """A small LRU of values computed from a project's published rounds, keyed by (what, project, served
    version, number of rounds); safe to share between the requests of one process."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """The cached value of `key`, computed (outside the lock: two requests may both compute it) when
        missing. An exception from `compute` propagates and caches nothing."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


def load_rounds(store: ModelStore, project: int) -> list[dict[str, Any]]:
    """Every published version's metrics, oldest first, with its `version`; an unreadable metrics file
    gives {"error": message} instead of failing the page."""
    rounds = []
    for version in store.list_versions(project):
        try:
            metrics = store.load_metrics(project, version)
        except StoreError as exc:
            metrics = {"error": str(exc)}
        rounds.append({**metrics, "version": version})
    return rounds


def round_forecast(rounds: list[dict[str, Any]], config: Config) -> dict[str, Any]:
    """The forecast (see `magral_core.method.forecast`) after the next `config.budget` labels, as JSON."""
    usable = [r for r in rounds if isinstance(r.get("n_labeled"), int)]
    return forecast(
        [r["n_labeled"] for r in usable],
        [r.get("map") if isinstance(r.get("map"), int | float) else None for r in usable],
        horizon=config.budget,
        flat_gain=config.forecast_flat_gain,
        seed=config.seed,
    ).to_json()


def cached_forecast(
    cache: VersionCache, project: int, current: str | None, rounds: list[dict[str, Any]], config: Config
) -> dict[str, Any]:
    key = ("forecast", project, current, len(rounds))
    value: dict[str, Any] = cache.get(key, lambda: round_forecast(rounds, config))
    return value


def project_status(
    services: Services, project: int, config: Config, cache: VersionCache, rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    """One project's entry of `/status` (JSON). A dead round is abandoned first (so its failure shows in
    `last_error` and it never shows as running); with Redis unreachable the queue's fields are None and
    `queue_unavailable` says so. `bad_input` is the latest round's tasks without boxes and why."""
    store = services.store
    queue_part: dict[str, Any] = {"running": None, "pending_annotations": None}
    if services.queue is not None:
        try:
            services.queue.reap_project(project, min_new=config.min_new_annotations)
            queue_part = {
                "running": services.queue.running(project),
                "pending_annotations": services.queue.pending_annotations(project),
            }
        except REDIS_DOWN as exc:
            log.warning("project=%s status without the queue: %s", project, exc)
            queue_part["queue_unavailable"] = QUEUE_UNAVAILABLE
    current = store.current_version(project)
    summary = [{k: r.get(k) for k in ROUND_KEYS} | {"version": r["version"]} for r in rounds]
    latest = summary[-1] if summary else {}
    info: dict[str, Any] = {
        "project": project,
        "current_version": current,
        "labeled": latest.get("n_labeled"),
        "unlabeled": latest.get("n_unlabeled"),
        "rounds": summary,
        "last_error": store.last_error(project),
        "errors": store.errors(project),
        "bad_input": rounds[-1].get("bad_input") if rounds else None,
        **queue_part,
        "forecast": cached_forecast(cache, project, current, rounds, config),
    }
    return info


def queue_status(services: Services) -> dict[str, Any] | None:
    """Jobs waiting and running in the round queue and the workers listening on it (None without Redis;
    `available` False with an `error` while Redis is unreachable)."""
    if services.queue is None:
        return None
    from rq import Worker
    from rq.registry import StartedJobRegistry

    queue = services.queue.queue
    try:
        return {
            "name": queue.name,
            "available": True,
            "queued": queue.count,
            "started": StartedJobRegistry(queue=queue).count,
            "workers": Worker.count(queue=queue),
        }
    except REDIS_DOWN as exc:
        return {"name": queue.name, "available": False, "error": f"{QUEUE_UNAVAILABLE} ({exc})"}


def progress_of(running: dict[str, Any] | None) -> dict[str, Any] | None:
    """{"stage", "fraction", ...} of a running round (jobs write it under `meta["progress"]`), or None."""
    if not running:
        return None
    meta = running.get("progress") or {}
    progress = meta.get("progress", meta) if isinstance(meta, dict) else {}
    return progress if isinstance(progress, dict) else None


def studio_url(config: Config, store: ModelStore, project: int) -> str | None:
    """Label Studio's base URL for links (the config's, else the one `/setup` saw); only http(s) URLs."""
    url = config.label_studio_url or store.load_connection(project).get("hostname", "")
    return url.rstrip("/") if url.startswith(("http://", "https://")) else None


def next_tasks(
    services: Services, config: Config, cache: VersionCache, info: dict[str, Any], *, limit: int = 20
) -> dict[str, Any] | None:
    """The served version's first `limit` tasks (see `backend.task_ranking.top_tasks`), cached per
    version; None before the first version or when its ranking file is missing."""
    version, project = info["current_version"], info["project"]
    if version is None:
        return None
    studio = studio_url(config, services.store, project)
    try:
        value: dict[str, Any] = cache.get(
            ("ranking", project, version, limit, studio),
            lambda: top_tasks(services.store, project, version, limit=limit, studio=studio),
        )
    except StoreError as exc:
        log.warning("project=%s version=%s no ranking: %s", project, version, exc)
        return None
    return value


def curve_png(services: Services, config: Config, cache: VersionCache, project: int) -> bytes:
    """The project's learning curve with its fitted forecast (see `backend.curve_plot`), drawn once per
    served version and number of rounds."""
    rounds = load_rounds(services.store, project)
    current = services.store.current_version(project)

    def draw() -> bytes:
        fit = cached_forecast(cache, project, current, rounds, config)
        return render_curve_png(
            [r.get("n_labeled") for r in rounds],
            [r.get("map") for r in rounds],
            [r.get("ap50") for r in rounds],
            title=f"project {project}: {current or 'untrained'}",
            fit=fit.get("params"),
            horizon=config.budget,
        )

    png: bytes = cache.get(("curve", project, current, len(rounds)), draw)
    return png
