"""JSON errors for every failure: a message saying what was expected and what was found, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from magral_core.errors import UserError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A client error with its HTTP status and a message (expected vs found)."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


def error_body(status: int, message: str, **details: Any) -> tuple[Any, int]:
    return jsonify({"error": message, "status": status, **details}), status


def register_error_handlers(app: Flask) -> None:
    """400/404/405/413/500 and the project's own errors as JSON."""

    @app.errorhandler(ApiError)
    def _api(exc: ApiError) -> tuple[Any, int]:
        return error_body(exc.status, exc.message, **exc.details)

    @app.errorhandler(UserError)
    def _user(exc: UserError) -> tuple[Any, int]:
        return error_body(400, str(exc))

    @app.errorhandler(413)
    def _too_large(exc: HTTPException) -> tuple[Any, int]:
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return error_body(413, f"expected a request body of at most {limit} bytes, found a larger one")

    @app.errorhandler(404)
    def _not_found(exc: HTTPException) -> tuple[Any, int]:
        return error_body(
            404,
            "no such endpoint; expected one of /health, /setup, /predict, /webhook, /versions, /status, "
            "/projects/<id>/ranking, /projects/<id>/curve.png",
        )

    @app.errorhandler(405)
    def _method(exc: HTTPException) -> tuple[Any, int]:
        allowed = sorted(getattr(exc, "valid_methods", None) or [])
        return error_body(405, f"method not allowed here; expected {', '.join(allowed) or 'another method'}")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[Any, int]:
        return error_body(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> tuple[Any, int]:
        log.exception("unhandled error: %s", type(exc).__name__)
        return error_body(500, f"internal error ({type(exc).__name__}); see the backend's log")
