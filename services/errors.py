"""The exceptions the front tier raises for a request it refuses, and their HTTP shape.

Routes turn them into their API's error body: BentoML's `{"error": ...}` for /generate, OpenAI's
`{"error": {"message", "type", "param", "code"}}` for /v1. Refusals for load or an unavailable GPU
tier carry `retry_after_s`, sent as the `Retry-After` header (docs/operations.md lists them all).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class RequestError(Exception):
    """A refused request: what was wrong and what is allowed, the field at fault, the HTTP status."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


class TierUnavailable(RequestError):
    """The GPU tier cannot be reached or is not ready: try again shortly."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, status=503)
        self.retry_after_s = retry_after_s


class Overloaded(RequestError):
    """More work in flight than the configured cap: try again shortly (429)."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, status=429)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RequestError):
    """The request ran past its deadline; its engine request was aborted (504)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=504)


OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize")
OPENAI_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def openai_error(error: RequestError) -> dict[str, Any]:
    """OpenAI's (and vLLM's) error body."""
    kind = OPENAI_ERROR_TYPES.get(error.status) or HTTPStatus(error.status).phrase
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.status}}


def error_body(path: str, error: RequestError) -> Any:
    """The error body a route at `path` gives: OpenAI's shape on the OpenAI app's routes, BentoML's
    elsewhere, so a refusal from a middleware (401, 413, 429, 503) looks like the route's own 400."""
    if path.startswith(OPENAI_PATHS):
        return openai_error(error)
    return {"error": error.message}


def error_headers(error: RequestError) -> dict[str, str]:
    retry_after = getattr(error, "retry_after_s", None)
    return {"Retry-After": str(retry_after)} if retry_after is not None else {}
