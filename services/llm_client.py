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
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar, Token
from urllib.parse import urlparse

import aiohttp

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


def http_session(url: str, timeout_s: float) -> aiohttp.ClientSession:
    """An HTTP session for a BentoML dependency URL (a Unix socket `file://...`, `tcp://`, or http).

    aiohttp, for its C HTTP parser: reading the stream through httpx (pure-Python h11 and a
    cancel scope per read) took a quarter to half of a front worker's CPU (docs/benchmarks.md). One
    connection per open stream (HTTP/1.1) and no cap on them (`limit=0`): a capped pool makes
    streams beyond the cap, and the tier's readiness checks, queue for a free connection."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        connector, base_url = aiohttp.UnixConnector(path=parsed.path, limit=0), "http://llm-service"
    else:
        connector = aiohttp.TCPConnector(limit=0)
        base_url = f"http://{parsed.netloc}" if parsed.scheme == "tcp" else url
    return aiohttp.ClientSession(
        base_url=base_url,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=timeout_s),
    )


class LLMClient:
    def __init__(self, url: str, *, timeout_s: float, monitor: TierMonitor | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.monitor = monitor
        self._session: aiohttp.ClientSession | None = None  # made in the event loop, on first use
        self._background: set[asyncio.Task] = set()

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = http_session(self.url, self.timeout_s + 10)  # the deadline ends a request first
        return self._session

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
            async with self._http.post("/generate", json={"request": request.model_dump()}) as response:
                if response.status != 200:
                    body = await response.read()
                    if response.status == 503 and self.monitor is not None:
                        self.monitor.mark_down("it answered 503")
                    raise _error_from(response.status, response.headers, body)
                decoder = DeltaDecoder()
                async for chunk in response.content.iter_any():
                    for delta in decoder.feed(chunk):
                        await frames.put(delta)
                if decoder.pending:
                    raise TierUnavailable("the GPU tier's stream ended inside a frame")
            await frames.put(_END)
        except (aiohttp.ClientError, TimeoutError) as error:  # connection refused, reset, cut, or silent
            if self.monitor is not None:
                self.monitor.mark_down(f"a call failed: {error!r}")
            await frames.put(TierUnavailable(f"the GPU tier is unreachable: {error!r}"))
        except RequestError as error:
            await frames.put(error)

    async def abort(self, request_ids: list[str]) -> None:
        body = {"request": AbortRequest(request_ids=request_ids).model_dump()}
        async with self._http.post("/abort", json=body, timeout=aiohttp.ClientTimeout(total=5.0)) as response:
            response.raise_for_status()

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            async with self._http.get("/readyz", timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _abort_in_background(self, request_id: str) -> None:
        async def abort() -> None:
            try:
                await self.abort([request_id])
            except Exception as error:  # the tier may be gone; closing the stream already aborted
                logger.debug("abort of %s failed: %r", request_id, error)

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _error_from(status: int, headers: Mapping[str, str], body: bytes) -> RequestError:
    """The GPU tier's refusal as the front tier's error (its 4xx messages are for the user)."""
    if status == 503:
        return TierUnavailable("the GPU tier answered 503: it is not ready")
    if status >= 500:
        return RequestError(f"the GPU tier failed on this request (HTTP {status}); see its log", status=502)
    if status == 429:
        retry_after = headers.get("Retry-After", "1")
        return Overloaded(
            "the GPU tier is at its limit of requests (PIPELINE_MAX_ENGINE_REQUESTS); try again shortly",
            retry_after_s=int(retry_after) if retry_after.isdigit() else 1,
        )
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
        if isinstance(parsed, list) and parsed:  # BentoML wraps a BentoMLException's message in a list
            parsed = parsed[0]
        message = parsed.get("error") if isinstance(parsed, dict) else None
    except ValueError:
        message = None
    return RequestError(message or text, status=status)
