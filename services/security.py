"""Who may call each tier, decided before anything of the request is read.

PromptService takes optional API keys (`PIPELINE_API_KEYS`); LLMService takes only calls carrying
the internal token (`PIPELINE_INTERNAL_TOKEN`), with JSON bodies, since BentoML would otherwise
unpickle a pickled body (docs/operations.md, "Threat model"). Keys are compared in constant time;
health and metrics paths stay open on both tiers.
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


def bearer_token(scope: Scope) -> str:
    scheme, _, token = header(scope, b"authorization").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class BearerAuthMiddleware:
    """401 unless the request carries one of `keys` as its Bearer token (open paths exempt)."""

    def __init__(self, app: ASGIApp, *, keys: Sequence[str], what: str = "a valid API key") -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.what = what

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        token = bearer_token(scope)
        if token and key_matches(token, self.keys):
            return await self.app(scope, receive, send)
        error = RequestError(f"{self.what} is required: send it as `Authorization: Bearer <key>`", status=401)
        await refuse(scope, receive, send, error, headers={"WWW-Authenticate": "Bearer"})


class JsonOnlyMiddleware:
    """415 for a request body that is not `application/json`, before BentoML reads it (its
    serializers include pickle, which runs code while loading)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            media_type = header(scope, b"content-type").split(";")[0].strip().lower()
            if media_type != "application/json":
                error = RequestError(
                    f"this service takes only `Content-Type: application/json` bodies; got {media_type or 'none'!r}",
                    status=415,
                )
                return await refuse(scope, receive, send, error)
        await self.app(scope, receive, send)


async def refuse(scope: Scope, receive: Receive, send: Send, error: RequestError,
                 headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(error_body(scope["path"], error), status_code=error.status, headers=headers)
    await response(scope, receive, send)


def header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def internal_auth_header(token: str) -> dict[str, str]:
    """The header the front tier sends with every call to the GPU tier."""
    return {"Authorization": f"Bearer {token}"}

