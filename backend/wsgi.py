"""gunicorn entry: `gunicorn backend.wsgi:app`. The app is built from the environment on first access, so
importing this module reads nothing."""

from __future__ import annotations

import logging
from typing import Any

_app: Any = None


def app_from_env() -> Any:
    """The application for this process's environment (`Config.from_env()`), built once."""
    global _app
    if _app is None:
        from backend.app import create_app
        from magral_core.config import Config

        config = Config.from_env()
        logging.basicConfig(
            level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        _app = create_app(config)
    return _app


def __getattr__(name: str) -> Any:
    if name == "app":
        return app_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
