"""Turning Label Studio events into rq jobs: at most one queued and one running round per project.

A round is a chain of rq jobs (`jobs.start_round` → `jobs.prepare_round` → [pool scoring chunks →
`jobs.pool_round`, when the pool is larger than one chunk] → look-up-table records → `jobs.propose_round`
→ near-policy records → `jobs.finish_round`; the later ones are queued at the front so a started round
finishes first). This module is the one place that enqueues: every job's dotted path, id, timeout and
result TTL is here (`enqueue_stage`, `enqueue_chunks`, `enqueue_records`, `enqueue_scoring`,
`enqueue_webhook_auth`). Per project, Redis holds (keys under `<prefix>:<project>:`):

- `new`: annotations created/updated/deleted since the running (or last) round began (an integer);
- `forced`: a START_TRAINING arrived since then (runs whatever `new` says);
- `active`: set while a round chain runs (JSON: the chain's current job id and version); it expires after
  the round timeout;
- `scored:<version>`: how many of that round's scoring chunks are done (`chunk_scored`, for its progress);
- `lease`: the running round's lease, a key with a short TTL (`lease_s`) that every job of the round renews
  while it runs (`renew_lease`, from a heartbeat thread in the job). A round is dead when its current job
  has gone or ended without `end_round`, or when that job is not waiting for a worker and the lease has
  expired (its worker was SIGKILLed, lost its machine...); a fan-in counts as waiting while one of its
  record or scoring jobs does. A dead round is detected on the next event, `/status` or a worker's
  periodic `reap` (so within `lease_s` + the reap period of the death), and handed to the `on_abandoned`
  hook (mark it failed, drop its files) before the follow-up it deferred is enqueued: a press or a burst
  of annotations during a dead round is never lost.

The rules, applied under a short per-project Redis lock:

- an event while no round is active enqueues `round-<project>` when `new >= min_new_annotations` or it is
  forced; while that job waits in the queue, further events only count (a burst gives ONE queued round);
- an event while a round runs only counts; when the round ends (`end_round`, success or failure), ONE
  follow-up is enqueued if the counted events qualify, and later events coalesce into it.

Job arguments are ids only (they travel through Redis: no configuration, no secret); the worker reads its
configuration from its own environment (see `magral_core.service.jobs`).

Deterministic job ids (rq allows letters, digits, "_" and "-" only): `round-<p>` (first step),
`round-<p>-prepare`, `round-<p>-score-<i>`, `round-<p>-pool`, `round-<p>-lut-<i>`, `round-<p>-propose`,
`round-<p>-finish`, `announce-<p>`, `webhook-auth-<p>`.

Redis errors (`redis.exceptions.ConnectionError`, `TimeoutError`) propagate: callers decide (the web answers
503, a worker retries with backoff).

Kept as one module because it is the one owner of every enqueue and of the per-project round state in Redis.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Dependency, Job, JobStatus

log = logging.getLogger(__name__)

QUEUE_NAME = "magral"
KEY_PREFIX = "magral"
PENDING = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED)
ENDED = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
JOBS = "magral_core.service.jobs"
ROUND_RESULT_TTL = 24 * 3600  # seconds a finished stage's result is kept (what /status shows)
RECORD_RESULT_TTL = 3600
LEASE_S = 15  # seconds a round's lease lives without renewal: a dead worker is detected after this
WAITING = (JobStatus.QUEUED, JobStatus.SCHEDULED)  # a job waiting for a worker is not dead


class Stage(StrEnum):
    """The stages of a round after `start_round`, each one rq job (`jobs.<stage>_round`)."""

    PREPARE = "prepare"
    POOL = "pool"
    """The fan-in of the pool's scoring chunks (only when the pool is larger than one chunk)."""
    PROPOSE = "propose"
    FINISH = "finish"


class Decision(StrEnum):
    """What an event did to the project's queue."""

    ENQUEUED = "enqueued"
    """A round was put in the queue."""
    COALESCED = "coalesced"
    """A round is already queued (or just starting) and will see this event."""
    DEFERRED = "deferred"
    """A round is running; a single follow-up round runs after it if the events qualify."""
    WAITING = "waiting"
    """Too few new annotations for an automatic round."""


@dataclass(frozen=True)
class RoundState:
    """What `begin_round` consumed: the events the starting round covers."""

    new_annotations: int
    forced: bool


@dataclass(frozen=True)
class DeadRound:
    """A round found dead: its project, the version it was building, its current job and why."""

    project: int
    version: str
    job_id: str
    reason: str


AbandonHook = Callable[["RoundQueue", DeadRound], None]
"""`on_abandoned(queue, dead)`: called under the project's lock once per dead round, before its follow-up is
enqueued (mark it failed in the store, remove its staging directory and reservation)."""


def round_job_id(project: int) -> str:
    return f"round-{project}"


def stage_job_id(project: int, stage: Stage) -> str:
    return f"round-{project}-{Stage(stage).value}"


def lut_job_id(project: int, index: int) -> str:
    return f"round-{project}-lut-{index}"


def score_job_id(project: int, index: int) -> str:
    return f"round-{project}-score-{index}"


class RoundQueue:
    """Coordinates rounds of many projects over one Redis connection and one rq queue."""

    def __init__(
        self,
        connection: Redis,
        *,
        queue_name: str = QUEUE_NAME,
        prefix: str = KEY_PREFIX,
        round_timeout: int = 6 * 3600,
        lease_s: int = LEASE_S,
        on_abandoned: AbandonHook | None = None,
    ) -> None:
        self.connection = connection
        self.queue = Queue(queue_name, connection=connection)
        self.prefix = prefix
        self.round_timeout = int(round_timeout)
        self.lease_s = int(lease_s)
        self.on_abandoned = on_abandoned

    # --- keys ----------------------------------------------------------------------------------------------
    def _key(self, project: int, name: str) -> str:
        return f"{self.prefix}:{int(project)}:{name}"

    def _lock(self, project: int) -> Any:
        return self.connection.lock(self._key(project, "lock"), timeout=30, blocking_timeout=30, sleep=0.01)

    # --- events --------------------------------------------------------------------------------------------
    def annotations_changed(self, project: int, count: int, *, min_new: int) -> Decision:
        """Count `count` changed annotations and enqueue a round if they reach `min_new`."""
        self.connection.incrby(self._key(project, "new"), max(0, int(count)))
        if self._running_fast(project):
            return Decision.DEFERRED
        with self._lock(project):
            return self._enqueue_if_due(project, min_new)

    def start_training(self, project: int) -> Decision:
        """START_TRAINING: a round always runs (now, or right after the running one)."""
        self.connection.set(self._key(project, "forced"), 1)
        if self._running_fast(project):
            return Decision.DEFERRED
        with self._lock(project):
            return self._enqueue_if_due(project, min_new=0)

    def _running_fast(self, project: int) -> bool:
        """A round is marked active, checked without the lock (a burst of webhooks during a round must not
        queue on it). Safe because the event was counted first: `end_round` deletes the mark before it reads
        the counts, so a mark seen here means that read comes later and sees this event. A dead round seen
        here is left to the next `reap`, which enqueues the follow-up these counts ask for."""
        return bool(self.connection.exists(self._key(project, "active")))

    def _enqueue_if_due(self, project: int, min_new: int) -> Decision:
        if self._round_active(project):
            return Decision.DEFERRED
        job = self._fetch(round_job_id(project))
        if job is not None:
            status = job.get_status(refresh=True)
            if status in PENDING:
                return Decision.COALESCED
            if status == JobStatus.STARTED:
                # picked up by a worker, not yet in begin_round: that round will consume these counts.
                return Decision.COALESCED
        new = int(self.connection.get(self._key(project, "new")) or 0)
        forced = bool(self.connection.exists(self._key(project, "forced")))
        if not forced and new < max(1, int(min_new)):
            return Decision.WAITING
        if job is not None:
            job.delete(remove_from_queue=True)
        self.queue.enqueue_call(
            f"{JOBS}.start_round",
            args=(int(project),),
            job_id=round_job_id(project),
            timeout=self.round_timeout,
            result_ttl=ROUND_RESULT_TTL,
            description=f"round of project {project}",
        )
        log.info("project=%s round enqueued new_annotations=%s forced=%s", project, new, forced)
        return Decision.ENQUEUED

    # --- the round's later jobs -----------------------------------------------------------------------------
    def enqueue_stage(
        self,
        project: int,
        stage: Stage,
        staging: str,
        *,
        depends_on: Sequence[Job] = (),
        meta: dict[str, Any] | None = None,
    ) -> Job:
        """Queue stage `stage` of the round building `staging` (at the front: a started round finishes
        first); after every job of `depends_on` has ended, failed ones included (the fan-in decides: a
        missing record is computed by it, a failed scoring chunk fails the round). A finished job of an
        earlier round holding the same id is removed first."""
        job_id = stage_job_id(project, stage)
        self._drop_stale(job_id)
        return self.queue.enqueue_call(
            f"{JOBS}.{Stage(stage).value}_round",
            args=(int(project), str(staging)),
            job_id=job_id,
            timeout=self.round_timeout,
            result_ttl=ROUND_RESULT_TTL,
            depends_on=(
                Dependency(jobs=list(depends_on), allow_failure=True, enqueue_at_front=True)
                if depends_on else None
            ),
            at_front=True,
            meta=meta,
        )

    def enqueue_records(self, project: int, staging: str, indices: Sequence[int]) -> list[Job]:
        """Queue one look-up-table record job per index of the round building `staging`."""
        return self._fan_out("lut_record", project, staging, indices, lut_job_id)

    def enqueue_chunks(self, project: int, staging: str, indices: Sequence[int]) -> list[Job]:
        """Queue one pool-scoring job (`jobs.score_chunk`) per chunk index of the round building
        `staging`."""
        return self._fan_out("score_chunk", project, staging, indices, score_job_id)

    def _fan_out(self, function: str, project: int, staging: str, indices: Sequence[int],
                 job_id: Callable[[int, int], str]) -> list[Job]:
        """One `jobs.<function>(project, staging, index)` job per index, at the front of the queue (a
        started round finishes first); a finished job of an earlier round holding the same id goes first."""
        jobs = []
        for index in indices:
            self._drop_stale(job_id(project, index))
            jobs.append(
                self.queue.enqueue_call(
                    f"{JOBS}.{function}",
                    args=(int(project), str(staging), int(index)),
                    job_id=job_id(project, index),
                    timeout=self.round_timeout,
                    result_ttl=RECORD_RESULT_TTL,
                    at_front=True,
                )
            )
        return jobs

    def chunk_scored(self, project: int, version: str) -> int:
        """A scoring chunk of the round building `version` is written: count it and set the fraction of
        chunks done in the progress of the round's `pool` stage job (whose meta `enqueue_stage` was given
        with `chunks`). Under the project's lock, so concurrent chunks never lower the fraction. Returns the
        chunks done so far; nothing is written when the project's active round is another one."""
        with self._lock(project):
            raw = self.connection.get(self._key(project, "active"))
            if not raw or json.loads(raw).get("version") != version:
                return 0
            key = self._key(project, f"scored:{version}")
            done = int(self.connection.incr(key))
            self.connection.expire(key, self.round_timeout)
            job = self._fetch(stage_job_id(project, Stage.POOL))
            progress = dict((job.meta or {}).get("progress") or {}) if job is not None else {}
            if job is not None and progress.get("version") == version and int(progress.get("chunks", 0)):
                progress["fraction"] = round(min(1.0, done / int(progress["chunks"])), 3)
                job.meta["progress"] = progress
                job.save_meta()
            return done

    def _drop_stale(self, job_id: str) -> None:
        """Remove a job of an earlier round that holds the id this round needs."""
        job = self._fetch(job_id)
        if job is not None:
            job.delete()

    # --- called by the round's jobs ------------------------------------------------------------------------
    def begin_round(self, project: int, *, job_id: str, version: str) -> RoundState:
        """Mark the project's round active and consume the event counts it covers."""
        with self._lock(project):
            pipe = self.connection.pipeline()
            pipe.getdel(self._key(project, "new"))
            pipe.getdel(self._key(project, "forced"))
            pipe.set(self._key(project, "active"), self._active_value(job_id, version), ex=self.round_timeout)
            pipe.set(self._key(project, "lease"), version, ex=self.lease_s)
            new, forced, _, _ = pipe.execute()
        return RoundState(int(new or 0), bool(forced))

    def touch(self, project: int, *, job_id: str, version: str) -> None:
        """The round moved on to job `job_id` (progress is read from that job's meta)."""
        self.connection.set(
            self._key(project, "active"), self._active_value(job_id, version), ex=self.round_timeout
        )

    def renew_lease(self, project: int, version: str) -> bool:
        """A job of the round building `version` is alive: extend the lease by `lease_s`. Returns False (and
        renews nothing) when the project's active round is another one (this round was reaped)."""
        raw = self.connection.get(self._key(project, "active"))
        if not raw or json.loads(raw).get("version") != version:
            return False
        self.connection.set(self._key(project, "lease"), version, ex=self.lease_s)
        return True

    def end_round(self, project: int, *, min_new: int, version: str | None = None) -> Decision:
        """The round is over (published or failed): clear `active`, enqueue the follow-up if one is due.
        With `version`, `active` is cleared only while it is that round's (a reaped round that ends late
        does not end its successor)."""
        with self._lock(project):
            raw = self.connection.get(self._key(project, "active"))
            if raw and (version is None or json.loads(raw).get("version") == version):
                self.connection.delete(self._key(project, "active"), self._key(project, "lease"))
            return self._enqueue_if_due(project, min_new)

    def reap(self, *, min_new: int) -> list[DeadRound]:
        """Every project's dead round (see the module docstring): abandoned through `on_abandoned`, then its
        deferred follow-up enqueued if due. What a worker calls every few seconds."""
        dead: list[DeadRound] = []
        suffix = ":active"
        for key in self.connection.scan_iter(match=f"{self.prefix}:*{suffix}"):
            name = key.decode() if isinstance(key, bytes) else str(key)
            head = name[len(self.prefix) + 1: -len(suffix)]
            if not head.isdigit():
                continue
            found = self.reap_project(int(head), min_new=min_new)
            if found is not None:
                dead.append(found)
        return dead

    def reap_project(self, project: int, *, min_new: int) -> DeadRound | None:
        """The project's round if it was dead (then abandoned and its follow-up enqueued), else None."""
        if not self.connection.exists(self._key(project, "active")):
            return None
        with self._lock(project):
            found = self._dead_round(project)
            if found is None:
                return None
            self._abandon(found)
            self._enqueue_if_due(project, min_new)
            return found

    def _round_active(self, project: int) -> bool:
        """Whether a round runs; a dead one (see `_dead_round`) is abandoned here instead of blocking the
        project until its mark expires. Called under the project's lock."""
        if not self.connection.exists(self._key(project, "active")):
            return False
        found = self._dead_round(project)
        if found is None:
            return True
        self._abandon(found)
        return False

    def _dead_round(self, project: int) -> DeadRound | None:
        """The active round when it is dead, else None (also None without an active round)."""
        raw = self.connection.get(self._key(project, "active"))
        if not raw:
            return None
        active = json.loads(raw)
        job_id, version = str(active.get("job_id", "")), str(active.get("version", ""))
        job = self._fetch(job_id)
        status = job.get_status(refresh=True) if job is not None else None

        def dead(reason: str) -> DeadRound:
            return DeadRound(project, version, job_id, reason)

        state = getattr(status, "value", status)
        if job is None or status in ENDED:
            return dead(f"its job {job_id} {'is gone' if job is None else f'is {state}'} without ending it")
        if status in WAITING:
            return None  # waiting for a worker: not dead, only slow
        if self.connection.exists(self._key(project, "lease")):
            return None
        if status == JobStatus.DEFERRED and any(
            d is not None and d.get_status(refresh=True) in WAITING
            for d in (self._fetch(i) for i in job.dependency_ids)
        ):
            return None  # its record or scoring jobs wait for a worker
        if time.time() - float(active.get("since", 0.0)) < self.lease_s or self._uptime() < self.lease_s:
            return None  # just begun, or Redis itself restarted: give the job one lease to renew
        return dead(
            f"no job of the round renewed its lease for {self.lease_s} s (its worker died) while {job_id} "
            f"was {state}"
        )

    def _uptime(self) -> float:
        info = self.connection.info("server")
        return float(info.get("uptime_in_seconds", 1e9))

    def _abandon(self, dead: DeadRound) -> None:
        log.warning("project=%s version=%s round abandoned: %s", dead.project, dead.version, dead.reason)
        if self.on_abandoned is not None:
            self.on_abandoned(self, dead)
        self.connection.delete(self._key(dead.project, "active"), self._key(dead.project, "lease"))

    def _active_value(self, job_id: str, version: str) -> str:
        return json.dumps({"job_id": job_id, "version": version, "since": time.time()})

    # --- telling Label Studio about a published version ---------------------------------------------
    def enqueue_announce(self, project: int, version: str) -> Job:
        """Push the published `version`'s predictions and switch Label Studio's sampling to it (idempotent:
        `jobs.announce_version`); for a version published by a round that died before it did so."""
        job_id = f"announce-{int(project)}"
        self._drop_stale(job_id)
        return self.queue.enqueue_call(
            f"{JOBS}.announce_version",
            args=(int(project), str(version)),
            job_id=job_id,
            timeout=self.round_timeout,
            result_ttl=RECORD_RESULT_TTL,
            at_front=True,
        )

    # --- scoring -------------------------------------------------------------------------------------------
    def enqueue_scoring(self, project: int, task_ids: Sequence[int]) -> Job:
        """Score newly created tasks with the current version."""
        ids = [int(t) for t in task_ids]
        return self.queue.enqueue_call(
            f"{JOBS}.score_tasks",
            args=(int(project), ids),
            timeout=self.round_timeout,
            result_ttl=RECORD_RESULT_TTL,
            description=f"score {len(ids)} new tasks of project {project}",
        )

    # --- basic auth on the project webhook -----------------------------------------------------------------
    def enqueue_webhook_auth(self, project: int, backend_url: str) -> bool:
        """Once per project: a job adding the basic-auth header to the project's webhook in Label Studio.
        Returns whether a job was enqueued (not when done before or already waiting)."""
        if self.connection.exists(self._key(project, "webhook_auth")):
            return False
        job_id = f"webhook-auth-{int(project)}"
        job = self._fetch(job_id)
        if job is not None and job.get_status(refresh=True) in (*PENDING, JobStatus.STARTED):
            return False
        if job is not None:
            job.delete()
        self.queue.enqueue_call(
            f"{JOBS}.secure_webhook",
            args=(int(project), backend_url),
            job_id=job_id,
            timeout=300,
            result_ttl=3600,
        )
        return True

    def webhook_auth_done(self, project: int) -> None:
        self.connection.set(self._key(project, "webhook_auth"), 1)

    # --- reading -------------------------------------------------------------------------------------------
    def pending_annotations(self, project: int) -> int:
        return int(self.connection.get(self._key(project, "new")) or 0)

    def running(self, project: int) -> dict[str, Any] | None:
        """The active round: job id, version, its rq status and the progress its job wrote into meta."""
        raw = self.connection.get(self._key(project, "active"))
        if not raw:
            job = self._fetch(round_job_id(project))
            if job is None or job.get_status(refresh=True) not in (*PENDING, JobStatus.STARTED):
                return None
            return {"job_id": job.id, "status": str(job.get_status().value), "progress": job.meta or {}}
        active = json.loads(raw)
        job = self._fetch(str(active.get("job_id", "")))
        info: dict[str, Any] = {
            "job_id": active.get("job_id"),
            "version": active.get("version"),
            "since": active.get("since"),
        }
        if job is not None:
            info["status"] = str(job.get_status(refresh=True).value)
            info["progress"] = job.meta or {}
        dead = self._dead_round(project)
        if dead is not None:  # never shown as started: the next reap abandons it
            info["status"], info["reason"] = "dead", dead.reason
        return info

    def _fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return None
