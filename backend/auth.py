"""Optional HTTP basic auth on every endpoint (`BASIC_AUTH_USER`, `BASIC_AUTH_PASS`; off when no user is set).

Label Studio sends the header on /health, /setup, /predict and START_TRAINING, but not on its auto-created
project webhook: `/setup` therefore asks a job to add the header to that webhook (see `jobs.secure_webhook`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from flask import Flask, request

from backend.errors import error_body


def credentials_match(header: str | None, user: str, password: str) -> bool:
    """Whether an `Authorization: Basic …` header carries `user:password` (constant-time comparison)."""
    if not header or not header.startswith("Basic "):
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    expected = f"{user}:{password}".encode()
    return hmac.compare_digest(decoded, expected)


def install_basic_auth(app: Flask, user: str, password: str) -> None:
    """Reject requests without the right credentials with 401 and a `WWW-Authenticate` challenge."""

    @app.before_request
    def _check() -> Any:
        if credentials_match(request.headers.get("Authorization"), user, password):
            return None
        body, status = error_body(
            401,
            "expected HTTP basic auth with the backend's user and password, found none or wrong credentials",
        )
        body.headers["WWW-Authenticate"] = 'Basic realm="magral"'
        return body, status
