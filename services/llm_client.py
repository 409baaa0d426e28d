"""The front tier's side of the contract: calls LLMService at the address `bentoml.depends` gives.

Why not the dependency proxy's own streaming call: the proxy never closes the HTTP response when
its caller stops reading (measured, see docs/architecture.md), so the engine would go on generating
for nobody. Here every stream is read under `async with`, so leaving it closes the connection
(the GPU tier's generator is cancelled and vLLM aborts the request), and an explicit `abort` call
follows as a second guarantee. Frames are reassembled from bytes with `DeltaDecoder`.

Failing safely: a request is refused at once (503) while the tier monitor says the GPU tier is
not ready; a connection failure marks the tier down; the GPU tier's 429 (engine at its cap) comes
back as `Overloaded`; and every generation has a deadline (`PIPELINE_REQUEST_TIMEOUT_S`), after
which the stream is closed, the engine request aborted and `DeadlineExceeded` raised. The HTTP
stream is read by a pump task of its own, so that the deadline (one timer per stream) can stop it
cleanly wherever it is waiting (for the response to start, or for the next frame).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar, Token
from urllib.parse import urlparse

import httpx

from services.errors import DeadlineExceeded, Overloaded, RequestError, TierUnavailable
from services.health import TierMonitor
from services.protocol import AbortRequest, DeltaDecoder, GenerateDelta, GenerateRequest

logger = logging.getLogger("bentoml.service.prompt")

_END = object()  # the GPU tier's stream ended normally
_EXPIRED = object()  # the request's deadline passed


def _expire(pump: asyncio.Task, frames: asyncio.Queue) -> None:
    """At the deadline: stop reading the GPU tier's stream and wake the reader of `frames`."""
    pump.cancel()
    if not frames.full():
        frames.put_nowait(_EXPIRED)


# --- engine streams left open by a request whose client went away ---------------------------------
# A server does not always close a response's generator when its client disconnects (it is left to
# the garbage collector), so nothing in the generator's `finally` can be relied on to stop the
# engine. The admission middleware therefore tracks the streams each HTTP request opens, and stops
# whatever is still open when the request's ASGI call ends.

_open_streams: ContextVar[dict[str, tuple["LLMClient", asyncio.Task]] | None] = ContextVar("open_streams", default=None)


def track_engine_streams() -> Token:
    """Start tracking the engine streams opened in this context (one HTTP request)."""
    return _open_streams.set({})


def stop_engine_streams(token: Token) -> int:
    """Stop the engine streams still open in this context and abort their engine requests;
    returns how many there were."""
    left = _open_streams.get() or {}
    _open_streams.reset(token)
    for request_id, (client, pump) in list(left.items()):
        client._abort_in_background(request_id)
        pump.cancel()
    return len(left)


def http_client(url: str, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client for a BentoML dependency URL (a Unix socket `file://...`, `tcp://`, or http).

    One connection per open stream (HTTP/1.1), and no cap on them: a capped pool makes streams
    beyond the cap, and the tier's readiness checks, queue for a free connection. The limits go
    to the transport, since httpx ignores a client's `limits` when it is given a transport (its
    default is 100 connections)."""
    parsed = urlparse(url)
    uds, base_url = None, url
    if parsed.scheme == "file":
        uds, base_url = parsed.path, "http://llm-service"
    elif parsed.scheme == "tcp":
        base_url = f"http://{parsed.netloc}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(
        base_url=base_url,
        transport=httpx.AsyncHTTPTransport(uds=uds, limits=limits),
        timeout=httpx.Timeout(timeout_s, connect=5.0),
    )


class LLMClient:
    def __init__(self, url: str, *, timeout_s: float, monitor: TierMonitor | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.monitor = monitor
        self._http = http_client(url, timeout_s + 10)  # the deadline below ends a request first
        self._background: set[asyncio.Task] = set()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """The engine's frames for one request; leaving early, or the deadline passing, aborts it
        on the GPU tier."""
        if self.monitor is not None:
            self.monitor.require()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        frames: asyncio.Queue = asyncio.Queue(maxsize=256)
        pump = loop.create_task(self._pump(request, frames))
        tracked = _open_streams.get()
        if tracked is not None:
            tracked[request.request_id] = (self, pump)
        # One timer per stream, not a timeout scope per frame (that was 5% of the front's CPU).
        deadline_timer = loop.call_at(deadline, _expire, pump, frames)
        complete = False
        finished: set[int] = set()
        held = None  # an item taken from the queue while coalescing, not yet handled
        try:
            while True:
                if held is None:
                    item = await frames.get()
                else:
                    item, held = held, None
                if item is _EXPIRED or loop.time() >= deadline:  # the time: the queue may have been full
                    raise DeadlineExceeded(
                        f"the request passed its deadline of {self.timeout_s:g} s (PIPELINE_REQUEST_TIMEOUT_S) "
                        "before the generation finished; it was stopped"
                    )
                if item is _END:
                    complete = True
                    return
                if isinstance(item, BaseException):
                    raise item
                # Frames that arrived while the caller was busy go on as one: a front worker that
                # falls behind then sends fewer, larger chunks instead of falling further behind
                # (vLLM's engine client merges its outputs the same way).
                while item.finish_reason is None and not frames.empty():
                    following = frames.get_nowait()
                    if not isinstance(following, GenerateDelta) or following.index != item.index:
                        held = following
                        break
                    item = item.followed_by(following)
                if item.finish_reason is not None:
                    finished.add(item.index)
                    # Every choice has ended in the engine: nothing is left to abort, even if the
                    # caller stops reading before the stream's end.
                    complete = len(finished) == request.sampling_params.n
                yield item
        finally:
            deadline_timer.cancel()
            if tracked is not None:
                tracked.pop(request.request_id, None)
            # Abort first: when the caller was cancelled (its client left), the await below may be
            # cancelled too, and nothing after it would run.
            if not complete:
                self._abort_in_background(request.request_id)
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def _pump(self, request: GenerateRequest, frames: asyncio.Queue) -> None:
        """Read the GPU tier's stream into `frames`: deltas, then _END or the error that ended it."""
        try:
            async with self._http.stream("POST", "/generate", json={"request": request.model_dump()}) as response:
                if response.status_code != 200:
                    await response.aread()
                    if response.status_code == 503 and self.monitor is not None:
                        self.monitor.mark_down("it answered 503")
                    raise _error_from(response)
                decoder = DeltaDecoder()
                async for chunk in response.aiter_bytes():
                    for delta in decoder.feed(chunk):
                        await frames.put(delta)
                if decoder.pending:
                    raise TierUnavailable("the GPU tier's stream ended inside a frame")
            await frames.put(_END)
        except httpx.TransportError as error:
            if self.monitor is not None:
                self.monitor.mark_down(f"a call failed: {error!r}")
            await frames.put(TierUnavailable(f"the GPU tier is unreachable: {error!r}"))
        except RequestError as error:
            await frames.put(error)

    async def abort(self, request_ids: list[str]) -> None:
        body = {"request": AbortRequest(request_ids=request_ids).model_dump()}
        response = await self._http.post("/abort", json=body, timeout=5.0)
        response.raise_for_status()

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            response = await self._http.get("/readyz", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        await self._http.aclose()

    def _abort_in_background(self, request_id: str) -> None:
        async def abort() -> None:
            try:
                await self.abort([request_id])
            except Exception as error:  # the tier may be gone; closing the stream already aborted
                logger.debug("abort of %s failed: %r", request_id, error)

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _error_from(response: httpx.Response) -> RequestError:
    """The GPU tier's refusal as the front tier's error (its 4xx messages are for the user)."""
    if response.status_code == 503:
        return TierUnavailable("the GPU tier answered 503: it is not ready")
    if response.status_code >= 500:
        return RequestError(f"the GPU tier failed on this request (HTTP {response.status_code}); see its log",
                            status=502)
    if response.status_code == 429:
        retry_after = response.headers.get("Retry-After", "1")
        return Overloaded(
            "the GPU tier is at its limit of requests (PIPELINE_MAX_ENGINE_REQUESTS); try again shortly",
            retry_after_s=int(retry_after) if retry_after.isdigit() else 1,
        )
    try:
        body = response.json()
        if isinstance(body, list) and body:  # BentoML wraps a BentoMLException's message in a list
            body = body[0]
        message = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        message = None
    return RequestError(message or response.text, status=response.status_code)
