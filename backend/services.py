"""What the endpoints talk to: the model store, the round queue, the Label Studio client and the predictor,
built from the config (`default_services`) or given by a test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backend.predictions import Predictor
from magral_core.config import Config
from magral_core.service.context import make_client, store_for
from magral_core.service.queue import RoundQueue
from magral_core.service.steps import StudioClient
from magral_core.service.store import ModelStore


@dataclass
class Services:
    """What the endpoints talk to; tests pass their own (a fake client, a dedicated Redis db).

    `queue` is None when no Redis is configured: `/webhook` then answers 503. Enqueued jobs receive ids only;
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

        queue = RoundQueue(Redis.from_url(config.redis_url), round_timeout=config.round_timeout)

    def client_for(project: int) -> StudioClient:
        return make_client(config, store, project)

    return Services(store, queue, client_for, Predictor(store, config, client_for=client_for))
