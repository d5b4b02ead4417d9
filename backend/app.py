"""The Flask application factory of the Label Studio ML backend."""

from __future__ import annotations

from flask import Flask

from backend.auth import install_basic_auth
from backend.errors import register_error_handlers
from backend.routes import blueprint
from backend.services import Services, default_services
from magral_core.config import Config


def create_app(config: Config, *, services: Services | None = None) -> Flask:
    """A Flask app serving /health, /setup, /predict, /webhook, /versions and /status for `config`."""
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


__all__ = ["create_app"]
