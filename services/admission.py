"""What the front door lets in, decided before any work is done on a request.

One ASGI middleware on PromptService, per worker process:
- every request body is read up to `max_body_bytes` before the route sees it (413 above, whether
  the client sent a Content-Length or not);
- a generation request (/generate, /v1/chat/completions, /v1/completions) is refused with 503 at
  once while the GPU tier is not ready (services/health.py), and with 429 while
  `max_inflight_requests` generation requests are already held by this worker (a request is held
  until its last byte is sent, so streams count for their whole life);
- every 429 and 503 leaves with `Retry-After`, and a 5xx refusal that BentoML would mask
  ("An unexpected error has occurred") leaves with its real message (`note_refusal`);
- when the request's ASGI call ends (its client may have left mid-stream), any engine stream it
  opened and nobody closed is stopped and its engine request aborted (services/llm_client.py).
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import Overloaded, RequestError, error_body, error_headers
from services.health import TierMonitor
from services.llm_client import stop_engine_streams, track_engine_streams

logger = logging.getLogger("bentoml.service.prompt")

GENERATION_PATHS = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})

_refusals: ContextVar[list[RequestError] | None] = ContextVar("refusals", default=None)


def note_refusal(error: RequestError) -> None:
    """Remember a refusal a route raises, so its real message survives BentoML's 5xx masking."""
    box = _refusals.get()
    if box is not None:
        box.append(error)


class AdmissionMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, max_inflight: int | None, tier: TierMonitor | None,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_inflight = max_inflight
        self.tier = tier
        self.retry_after_s = retry_after_s
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        generation = path in GENERATION_PATHS and scope["method"] == "POST"
        holds_slot = False
        try:
            try:
                declared = _content_length(scope)
                if declared is not None and declared > self.max_body_bytes:
                    raise self._too_large(declared)
                if generation:
                    if self.tier is not None:
                        self.tier.require()
                    if self.max_inflight is not None and self.inflight >= self.max_inflight:
                        raise Overloaded(
                            f"this server is at its limit of {self.max_inflight} requests in flight per worker "
                            f"(PIPELINE_MAX_INFLIGHT_REQUESTS); try again in {self.retry_after_s} s",
                            retry_after_s=self.retry_after_s,
                        )
                    # Taken before the body is read: with the check and the count apart, requests
                    # whose bodies were still arriving all passed the check together.
                    self.inflight += 1
                    holds_slot = True
                body = await self._read_body(receive) if scope["method"] in ("POST", "PUT", "PATCH") else b""
            except RequestError as error:
                await _respond(scope, receive, send, error)
                return
            except _Disconnected:
                return
            await self._forward(scope, receive, send, body)
        finally:
            if holds_slot:
                self.inflight -= 1

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Run the app with the body already read, tracking the engine streams the request opens."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        box: list[RequestError] = []
        token = _refusals.set(box)
        streams = track_engine_streams()
        try:
            await self.app(scope, replay if scope["method"] in ("POST", "PUT", "PATCH") else receive,
                           self._restoring_send(scope, send, box))
        finally:
            left = stop_engine_streams(streams)
            if left:
                logger.info("%s ended with %d engine stream(s) still open (client gone): aborted", scope["path"], left)
            _refusals.reset(token)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, declared: int | None) -> RequestError:
        size = f"{declared} bytes" if declared is not None else "more than that"
        return RequestError(
            f"the request body is {size}; the limit is {self.max_body_bytes} bytes (PIPELINE_MAX_BODY_BYTES)",
            status=413,
        )

    def _restoring_send(self, scope: Scope, send: Send, box: list[RequestError]) -> Send:
        """Add Retry-After to 429/503 and put a noted refusal's message back into a masked 5xx body."""
        replacing = False

        async def wrapped(message: Message) -> None:
            nonlocal replacing
            if message["type"] == "http.response.start":
                status = message["status"]
                refusal = next((error for error in box if error.status == status), None)
                if status >= 500 and refusal is not None:
                    replacing = True
                    payload = json.dumps(error_body(scope["path"], refusal)).encode()
                    headers = [(k, v) for k, v in message.get("headers", [])
                               if k.lower() not in (b"content-length", b"content-type")]
                    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
                    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(refusal).items()
                                if k.lower().encode() not in {h for h, _ in headers}]
                    await send({**message, "headers": headers})
                    await send({"type": "http.response.body", "body": payload, "more_body": False})
                    return
                if status in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in message.get("headers", [])):
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"retry-after", str(self.retry_after_s).encode())]}
            elif replacing:
                return  # the masked body is dropped; ours was sent
            await send(message)

        return wrapped


class _Disconnected(Exception):
    pass


async def _respond(scope: Scope, receive: Receive, send: Send, error: RequestError) -> None:
    response = JSONResponse(error_body(scope["path"], error), status_code=error.status, headers=error_headers(error))
    await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
