"""What the front door lets in, and the one place a generation request's life begins and ends.

One ASGI middleware per PromptService worker: every body is read up to `max_body_bytes` (413), a
generation request is refused at once (503) while the GPU tier is not ready, and each generation
request runs under one `InflightRequest` until its call ends or its client leaves. Every 429 and
503 carries `Retry-After` (docs/architecture.md, "The front door").
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.connection import BodyTooLarge, ClientLeft, read_body, run_until_client_leaves
from services.errors import RequestError, error_body, error_headers
from services.front.health import TierMonitor
from services.front.inflight import InflightRequest, SequenceBudget
from services.security import refuse

logger = logging.getLogger("bentoml.service.prompt")

GENERATION_PATHS = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})


class AdmissionMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, budget: SequenceBudget, tier: TierMonitor | None,
        timeout_s: float, max_streams_per_request: int, retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.budget = budget
        self.tier = tier
        self.timeout_s = timeout_s
        self.max_streams_per_request = max_streams_per_request
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        generation = scope["path"] in GENERATION_PATHS and scope["method"] == "POST"
        try:
            if generation and self.tier is not None:
                if not self.tier.ready:
                    await self.tier.confirm_at_start()
                self.tier.require()
            body = await read_body(scope, receive, self.max_body_bytes)
        except RequestError as error:
            return await refuse(scope, receive, send, error, headers=error_headers(error))
        except BodyTooLarge as error:
            size = f"{error.declared} bytes" if error.declared is not None else "more than that"
            too_large = RequestError(
                f"the request body is {size}; the limit is {self.max_body_bytes} bytes (PIPELINE_MAX_BODY_BYTES)",
                status=413,
            )
            return await refuse(scope, receive, send, too_large)
        except ClientLeft:
            return
        if not generation:
            return await run_until_client_leaves(self.app, scope, body, receive, send)

        life = InflightRequest(self.budget, timeout_s=self.timeout_s, max_streams=self.max_streams_per_request)
        token = life.enter()
        try:
            await run_until_client_leaves(self.app, scope, body, receive, self._send(scope, send, life),
                                          on_client_left=life.mark_client_left)
        finally:
            life.close()
            InflightRequest.leave(token)
            if life.client_left:
                logger.info("%s: the client left; its GPU-tier streams were closed", scope["path"])

    def _send(self, scope: Scope, send: Send, life: InflightRequest) -> Send:
        """Add Retry-After to 429/503, put a noted refusal's message back into a masked 5xx body,
        and hold back the last chunk of a response that failed after it started."""
        replacing = False

        async def wrapped(message: Message) -> None:
            nonlocal replacing
            if message["type"] == "http.response.start":
                status = message["status"]
                refusal = life.refusal if life.refusal is not None and life.refusal.status == status else None
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
            elif life.broken is not None and not message.get("more_body", False):
                logger.warning("%s failed after its response started, ended without its last chunk: %s",
                               scope["path"], life.broken.message)
                return
            await send(message)

        return wrapped
