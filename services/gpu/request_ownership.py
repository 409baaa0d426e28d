"""Each HTTP call to LLMService owns the engine requests it starts, and they end with it.

`EngineRequestsPerCall` (ASGI middleware) reads the body, bounded, and runs the call until its
client leaves (services/connection.py); whatever engine request the call started and that has not
finished is then aborted, here, on the replica that runs it. There is no abort route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from services.connection import BodyTooLarge, ClientLeft, read_body, run_until_client_leaves
from services.errors import RequestError
from services.gpu.metrics import engine_metrics
from services.security import refuse

# The largest body a call may carry: a prompt of a million token ids is about 7 MB of JSON.
MAX_BODY_BYTES = 64 * 2**20

# The engine requests the current HTTP call started and that have not finished, with how to abort them.
_call_requests: ContextVar[dict[str, Callable[[list[str]], Awaitable[None]]] | None] = ContextVar(
    "call_requests", default=None
)


def own_engine_request(request_id: str, abort: Callable[[list[str]], Awaitable[None]]) -> None:
    """The current call started this engine request: abort it if the call ends first."""
    started = _call_requests.get()
    if started is not None:
        started[request_id] = abort


def release_engine_request(request_id: str) -> None:
    """The engine request finished (or never started): nothing to abort."""
    started = _call_requests.get()
    if started is not None:
        started.pop(request_id, None)


class EngineRequestsPerCall:
    """ASGI middleware: the engine requests an HTTP call started live no longer than the call.

    The call runs until its client leaves (services/connection.py); when it ends, whatever engine
    request it started and that has not finished is aborted: no second call is needed, and the
    abort happens on the replica that runs the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            body = await read_body(scope, receive, MAX_BODY_BYTES)
        except ClientLeft:
            return
        except BodyTooLarge:
            return await refuse(scope, receive, send, RequestError(f"the body is over {MAX_BODY_BYTES} bytes", status=413))
        started: dict[str, Callable[[list[str]], Awaitable[None]]] = {}
        token = _call_requests.set(started)
        try:
            await run_until_client_leaves(self.app, scope, body, receive, send)
        finally:
            _call_requests.reset(token)
            for request_id, abort in list(started.items()):
                engine_metrics().aborted.inc()
                await abort([request_id])
