"""The one exception the front tier raises for a request it refuses.

Routes turn it into their API's error shape: BentoML's `{"error": ...}` for /generate, OpenAI's
`{"error": {"message", "type", "param", "code"}}` for /v1.
"""

from __future__ import annotations


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
