"""Optional API keys on the front door: `Authorization: Bearer <key>`, compared in constant time.

With no keys configured (`PIPELINE_API_KEYS` empty, the default) the middleware is not installed.
Health and metrics endpoints stay open, so probes and Prometheus need no key. LLMService has no
keys of its own: it must only be reachable inside the deployment (docs/operations.md).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.errors import RequestError, error_body

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


def key_matches(given: str, keys: Sequence[bytes]) -> bool:
    """True if `given` equals one of `keys`; every key is compared, each in constant time."""
    candidate = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = _header(scope, b"authorization").partition(" ")
        if scheme.lower() == "bearer" and token and key_matches(token.strip(), self.keys):
            return await self.app(scope, receive, send)
        error = RequestError(
            "a valid API key is required: send it as `Authorization: Bearer <key>`", status=401
        )
        response = JSONResponse(error_body(scope["path"], error), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""
