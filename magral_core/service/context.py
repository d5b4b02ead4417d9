"""What a worker process's jobs use: its configuration, the model store and how to build the Label Studio
client and the round's steps.

Job arguments travel through Redis, so they carry no secret: the worker reads its `Config` from its own
environment once, in its entry (`magral worker`), and installs it here with `install(WorkerContext(...))`
before it forks; every job reads it back with `current()`. The context also names the factories of the
Label Studio client and of the round's steps, so an embedding application or a test can swap them. This
module is the one owner of that per-process state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from magral_core.config import Config
from magral_core.service import bindings, stages
from magral_core.service.queue import AbandonHook, DeadRound, RoundQueue
from magral_core.service.steps import RoundSteps, StudioAdmin
from magral_core.service.store import ModelStore


def store_for(config: Config) -> ModelStore:
    """The model store of a config: `<home>/projects`."""
    return ModelStore(config.home / "projects")


def recovery(store: ModelStore) -> AbandonHook:
    """What is done with a dead round (the `RoundQueue.on_abandoned` of workers and of the web): mark it
    failed and drop its files (`stages.abandon`); if it had published but not told Label Studio, queue the
    announcement."""

    def on_abandoned(queue: RoundQueue, dead: DeadRound) -> None:
        if stages.abandon(store, dead.project, dead.version, dead.reason):
            queue.enqueue_announce(dead.project, dead.version)

    return on_abandoned


def make_client(config: Config, store: ModelStore, project: int) -> StudioAdmin:
    """The Label Studio client of the config, falling back to the hostname/token `/setup` saw."""
    from magral_core.studio import LabelStudioClient

    seen = store.load_connection(project)
    return LabelStudioClient.from_config(
        config, url=seen.get("hostname", ""), api_key=seen.get("access_token", "")
    )


@dataclass(frozen=True)
class WorkerContext:
    """What the jobs of one worker process use.

    `config` is the worker's own `Config.from_env()`; `client_factory(config, store, project)` builds the
    Label Studio client (default `make_client`); `steps_factory()` gives a round's steps (default
    `bindings.default_steps`).
    """

    config: Config
    client_factory: Callable[[Config, ModelStore, int], StudioAdmin] = make_client
    steps_factory: Callable[[], RoundSteps] = bindings.default_steps

    @property
    def store(self) -> ModelStore:
        return store_for(self.config)

    def client(self, project: int) -> StudioAdmin:
        """The Label Studio client for `project` (may raise: no URL, no key)."""
        return self.client_factory(self.config, self.store, project)


_installed: WorkerContext | None = None


def install(worker_context: WorkerContext | None) -> None:
    """Make `worker_context` what this process's jobs use (None uninstalls). Called by the worker entry
    before the worker forks, so every work horse inherits it."""
    global _installed
    _installed = worker_context


def current() -> WorkerContext:
    """The installed context. Raises RuntimeError when none is (the job runs outside `magral worker`)."""
    if _installed is None:
        raise RuntimeError(
            "expected a worker context installed by the worker entry (`magral worker`, or "
            "context.install(WorkerContext(config)) before the worker starts), found none"
        )
    return _installed
