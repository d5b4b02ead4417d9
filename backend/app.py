"""The Flask application factory of the Label Studio ML backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask

from backend.auth import install_basic_auth
from backend.errors import register_error_handlers
from backend.predictions import Predictor
from magral_core.config import Config
from magral_core.queueing import RoundQueue
from magral_core.store import ModelStore


@dataclass
class Services:
    """What the endpoints talk to; tests pass their own (a fake client, a dedicated Redis db).

    `queue` is None when no Redis is configured: `/webhook` then answers 503. Enqueued jobs receive ids only;
    workers read their own configuration (see `magral_core.jobs`).
    """

    store: ModelStore
    queue: RoundQueue | None
    client_for: Callable[[int], Any]
    predictor: Predictor


def default_services(config: Config) -> Services:
    """Services built from the config alone (what gunicorn's workers use)."""
    from magral_core import jobs

    store = jobs.store_for(config)
    queue = None
    if config.redis_url:
        from redis import Redis

        queue = RoundQueue(Redis.from_url(config.redis_url), round_timeout=config.round_timeout)

    def client_for(project: int) -> Any:
        return jobs.make_client(config, store, project)

    return Services(store, queue, client_for, Predictor(store, config, client_for=client_for))


def create_app(config: Config, *, services: Services | None = None) -> Flask:
    """A Flask app serving /health, /setup, /predict, /webhook, /versions and /status for `config`."""
    from backend.routes import blueprint

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.config["MAGRAL_CONFIG"] = config
    app.config["MAGRAL_SERVICES"] = services or default_services(config)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    register_error_handlers(app)
    # Label Studio gives /setup 3 s; parsing the first label config imports the SDK's label interface
    # (~1.6 s), so pay that once at start-up rather than inside a request.
    import label_studio_sdk.label_interface  # noqa: F401
    if config.basic_auth_user:
        install_basic_auth(app, config.basic_auth_user, config.basic_auth_pass)
    app.register_blueprint(blueprint)
    return app
