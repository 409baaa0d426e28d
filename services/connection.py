"""One HTTP request at the ASGI level, on either tier: its body, read whole and bounded, its work
ended as soon as its client goes away, and its connection ended after a generation
(`SpreadConnections`), so that a service's workers share a client's requests.

`run_until_client_leaves` runs the app as a task of its own and watches the connection itself, as
a server does not reliably stop a route whose client left. Cancelling the app closes every stream
it opened, which is how a request ends on both tiers (docs/architecture.md, "Reaching LLMService").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ClientLeft(Exception):
    """The client disconnected before its request body arrived."""


class BodyTooLarge(Exception):
    def __init__(self, declared: int | None) -> None:
        super().__init__(declared)
        self.declared = declared


def declared_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused (`BodyTooLarge`) past `limit` bytes, whether or not the
    client declared a Content-Length."""
    declared = declared_length(scope)
    if declared is not None and declared > limit:
        raise BodyTooLarge(declared)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(None)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def run_until_client_leaves(
    app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send,
    on_client_left: Callable[[], None] | None = None,
) -> None:
    """Run `app` on a body already read; cancel it if the client leaves before the response ends.

    Only this function reads the connection's `receive` from here on (once the body is read, the
    only message left is `http.disconnect`); the app gets the body, then a disconnect message
    when the client has gone.
    """
    left = asyncio.Event()
    response_complete = False
    body_given = False

    async def app_receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def app_send(message: Message) -> None:
        nonlocal response_complete
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            response_complete = True
        await send(message)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # nothing else can come after a complete body
        left.set()

    work = asyncio.ensure_future(app(scope, app_receive, app_send))
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not work.done() and not response_complete:  # the client went away mid-request
            if on_client_left is not None:
                on_client_left()
            work.cancel()
        await asyncio.wait((work,))
        if not work.cancelled() and work.exception() is not None:
            raise work.exception()
    finally:
        watcher.cancel()
        if not work.done():  # this call itself was cancelled (the server is shutting down)
            work.cancel()
        await asyncio.gather(watcher, work, return_exceptions=True)


class SpreadConnections:
    """ASGI middleware: a response on one of `paths` ends its connection (`Connection: close`, which
    uvicorn honours), so the client's next request goes to whichever of the service's workers
    accepts it first. The workers share one accept queue, and kept-alive connections opened in a
    burst stay with the worker that accepted them (docs/architecture.md, "The front door")."""

    def __init__(self, app: ASGIApp, *, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)
