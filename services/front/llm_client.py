"""The front tier's client of LLMService, at the address `bentoml.depends` gives (`LLMClient`).

Every stream is read under `async with`, so leaving it closes the connection and LLMService aborts
the engine request (BentoML's own dependency proxy does not close it). Every call carries the
internal token, and every stream ends at its request's deadline. Which failures mark the tier
down: docs/architecture.md, "The front door".
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import TypeVar
from urllib.parse import urlparse

import aiohttp
from pydantic import BaseModel

from services.errors import DeadlineExceeded, Overloaded, RequestError, TierUnavailable
from services.front.health import TierMonitor, is_local_exhaustion
from services.protocol import (
    AdapterUpdate,
    CacheEvents,
    DeltaDecoder,
    FrameDecoder,
    GenerateDelta,
    GenerateRequest,
    LoadAdapterRequest,
    ModelInfo,
    UnloadAdapterRequest,
)
from services.security import internal_auth_header

logger = logging.getLogger("bentoml.service.prompt")

T = TypeVar("T", bound=BaseModel)

_END = object()  # the GPU tier's stream ended normally
_EXPIRED = object()  # the request's deadline passed


def _expire(pump: asyncio.Task, frames: asyncio.Queue) -> None:
    """At the deadline: stop reading the GPU tier's stream and wake the reader of `frames`."""
    pump.cancel()
    if not frames.full():
        frames.put_nowait(_EXPIRED)


def http_session(url: str, timeout_s: float, headers: Mapping[str, str] | None = None) -> aiohttp.ClientSession:
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
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=timeout_s),
    )


class LLMClient:
    def __init__(self, url: str, *, token: str, timeout_s: float, monitor: TierMonitor | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.monitor = monitor
        self._headers = internal_auth_header(token)
        self._session: aiohttp.ClientSession | None = None  # made in the event loop, on first use

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # the request's deadline ends a silent stream first
            self._session = http_session(self.url, self.timeout_s + 10, self._headers)
        return self._session

    async def generate(self, request: GenerateRequest, *, deadline: float, timeout_s: float) -> AsyncIterator[GenerateDelta]:
        """The engine's frames for one request until `deadline` (event-loop time; `timeout_s` is
        what the error message names). Leaving early closes the stream, which aborts the engine
        request on the GPU tier."""
        if self.monitor is not None:
            self.monitor.require()
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue = asyncio.Queue(maxsize=256)
        pump = loop.create_task(self._pump(request, frames))
        # One timer per stream, not a timeout scope per frame (that was 5% of the front's CPU).
        deadline_timer = loop.call_at(deadline, _expire, pump, frames)
        held = None  # an item taken from the queue while coalescing, not yet handled
        try:
            while True:
                if held is None:
                    item = await frames.get()
                else:
                    item, held = held, None
                if item is _EXPIRED or loop.time() >= deadline:  # the time: the queue may have been full
                    raise DeadlineExceeded(
                        f"the request passed its deadline of {timeout_s:g} s (PIPELINE_REQUEST_TIMEOUT_S) "
                        "before the generation finished; it was stopped"
                    )
                if item is _END:
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
                yield item
        finally:
            deadline_timer.cancel()
            pump.cancel()  # closes the connection if the stream is still open
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
                try:
                    async for chunk in response.content.iter_any():
                        for delta in decoder.feed(chunk):
                            await frames.put(delta)
                except BaseException:
                    response.close()  # not back to the pool: the GPU tier sees the connection close
                    raise
                if decoder.pending:
                    raise TierUnavailable("the GPU tier's stream ended inside a frame")
            await frames.put(_END)
        except (aiohttp.ClientError, OSError, TimeoutError) as error:  # refused, reset, cut, silent, or local
            await frames.put(self._call_failed(error))
        except RequestError as error:
            await frames.put(error)

    async def model_info(self, timeout_s: float = 5.0) -> ModelInfo:
        """What the engine serves: its context length, vocabulary and EOS ids (authenticated: a
        401 here means the tiers hold different internal tokens)."""
        return await self._call("/model_info", {}, ModelInfo, timeout_s)

    async def update_adapter(self, request: LoadAdapterRequest | UnloadAdapterRequest, timeout_s: float = 300.0,
                             *, require_ready: bool = True) -> AdapterUpdate:
        """Load or unload a LoRA adapter on the GPU tier (its outcome, vLLM's status included);
        `require_ready` false for a replica being brought up to date before it is marked ready."""
        if require_ready and self.monitor is not None:
            self.monitor.require()
        route = "/load_lora_adapter" if isinstance(request, LoadAdapterRequest) else "/unload_lora_adapter"
        try:
            return await self._call(route, {"request": request.model_dump()}, AdapterUpdate, timeout_s)
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise self._call_failed(error) from error

    async def _call(self, route: str, body: dict, answer: type[T], timeout_s: float) -> T:
        """One JSON call to the GPU tier: its answer as `answer`, or its refusal as an error."""
        async with self._http.post(route, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            content = await response.read()
            if response.status != 200:
                raise _error_from(response.status, response.headers, content)
            return answer.model_validate_json(content)

    async def kv_events(self, silence_s: float) -> AsyncIterator[CacheEvents]:
        """The replica's `/kv_events` stream (a snapshot, then deltas and load frames), until it
        ends, the caller leaves (which closes the connection) or it sends nothing for `silence_s`
        (TimeoutError: the replica sends its load at least every second, so a silent stream is a
        hung host or a connection dropped on the way, which would otherwise look like a quiet cache)."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=silence_s)
        async with self._http.post("/kv_events", json={}, timeout=timeout) as response:
            if response.status != 200:
                raise _error_from(response.status, response.headers, await response.read())
            decoder = FrameDecoder(CacheEvents)
            async for chunk in response.content.iter_any():
                for frame in decoder.feed(chunk):
                    yield frame

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            async with self._http.get("/readyz", timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            if is_local_exhaustion(error):
                raise  # this worker's trouble: the monitor keeps the tier's state as it was
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _call_failed(self, error: BaseException) -> RequestError:
        if is_local_exhaustion(error):
            logger.error("a call to the GPU tier failed on this worker's side: %r", error)
            return RequestError(f"this front worker is out of resources ({error!r}); try again", status=503)
        if self.monitor is not None:
            self.monitor.mark_down(f"a call failed: {error!r}")
        return TierUnavailable(f"the GPU tier is unreachable: {error!r}")


def _error_from(status: int, headers: Mapping[str, str], body: bytes) -> RequestError:
    """The GPU tier's refusal as the front tier's error (its 4xx messages are for the user)."""
    if status == 503:
        return TierUnavailable("the GPU tier answered 503: it is not ready")
    if status == 401:
        logger.error("the GPU tier refused this tier's internal token: PIPELINE_INTERNAL_TOKEN differs between the tiers")
        return TierUnavailable("the GPU tier refused this tier's credentials (PIPELINE_INTERNAL_TOKEN differs between the tiers)")
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
