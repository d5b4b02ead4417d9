"""What the endpoints talk to: the model store, the round queue, the Label Studio client and the predictor,
built from the config (`default_services`) or given by a test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backend.predictions import Predictor
from magral_core.config import Config
from magral_core.service.context import make_client, recovery, store_for
from magral_core.service.queue import RoundQueue
from magral_core.service.steps import StudioClient
from magral_core.service.store import ModelStore

REDIS_CONNECT_S = 2.0  # seconds to connect to Redis before an endpoint reports the queue unreachable
REDIS_TIMEOUT_S = 5.0  # seconds a Redis command may take


@dataclass
class Services:
    """What the endpoints talk to; tests pass their own (a fake client, a dedicated Redis db).

    `queue` is None when no Redis is configured: `/webhook` then answers 503 (as it does while Redis is
    unreachable; `/status` then answers from the store alone). Enqueued jobs receive ids only;
    workers read their own configuration (see `magral_core.service.context`).
    """

    store: ModelStore
    queue: RoundQueue | None
    client_for: Callable[[int], StudioClient]
    predictor: Predictor


def default_services(config: Config) -> Services:
    """Services built from the config alone (what gunicorn's workers use)."""
    store = store_for(config)
    queue = None
    if config.redis_url:
        from redis import Redis

        # short timeouts: with Redis down an endpoint answers in seconds (503 or "queue unavailable")
        connection = Redis.from_url(config.redis_url, socket_connect_timeout=REDIS_CONNECT_S,
                                    socket_timeout=REDIS_TIMEOUT_S)
        queue = RoundQueue(connection, round_timeout=config.round_timeout, on_abandoned=recovery(store))

    def client_for(project: int) -> StudioClient:
        return make_client(config, store, project)

    return Services(store, queue, client_for, Predictor(store, config, client_for=client_for))
