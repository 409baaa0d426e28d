"""A stand-in GPU tier for hermetic tests: LLMService's contract and its real door, no engine.

It wears LLMService's own middlewares (internal token, JSON only, engine requests owned by their
call), so what the front tier meets here is what it meets in production, except the engine. What
a `/generate` call does is chosen by the prompt's first token id (`Behaviour`), or for every call
by `refuse_with` (a status, as a failing replica answers); the fake records which requests ran,
which it saw aborted, and how many streams were open at once.

As a replica of several (services/front/routing/), it serves `/kv_events` per the contract
(services/protocol.py's `CacheEvents`: a snapshot with its `epoch`, then deltas, every frame saying
`degraded`, and a frame at least every `frame_every_s`) when `kv_events` is set: a prompt it runs
is pending (its `block_keys`) until its blocks are stored (services/kv_blocks.py), and a test may
`store`, `evict`, `announce_pending`, `report_load`, `lose_index`, `cut_event_streams`, make the
streams go `silent` or `restart` it as a new engine.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from services.gpu.request_ownership import EngineRequestsPerCall, own_engine_request, release_engine_request
from services.kv_blocks import block_keys
from services.protocol import (
    AdapterInfo,
    AdapterUpdate,
    CacheEvents,
    GenerateDelta,
    GenerateRequest,
    LoadAdapterRequest,
    ModelInfo,
    ReplicaLoad,
    UnloadAdapterRequest,
    encode_frame,
)
from services.security import BearerAuthMiddleware, JsonOnlyMiddleware

TOKEN = "fake-internal-token-0123456789"
VOCAB = 49152
CONTEXT = 2048
_starts = itertools.count(1)


def new_epoch() -> str:
    return f"fake-start-{next(_starts)}"


class Behaviour(IntEnum):
    """The first prompt token id picks what the fake does."""

    PACED = 1  # one token every 10 ms until max_tokens, then finish "length"
    SLOW = 2  # one token a second
    FAIL = 3  # HTTP 500
    CUT = 4  # two tokens, then the stream ends without a finish
    BUSY = 5  # HTTP 429 (the engine at its cap)
    INVALID = 6  # HTTP 400 with a message


@dataclass
class FakeGpuTier:
    ready: bool = True
    eos_token_ids: list[int] = field(default_factory=lambda: [2])  # SmolLM2's <|im_end|>
    started: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    open_streams: int = 0
    peak_streams: int = 0
    adapters: list[AdapterInfo] = field(default_factory=list)  # LoRA adapters it serves
    adapter_of: dict[str, str | None] = field(default_factory=dict)  # request id -> the adapter it named
    received: list[str] = field(default_factory=list)  # every /generate request id, refused or not
    refuse_with: int | None = None  # answer every /generate with this status (503, 429, 500, 400)
    # its prefix cache, for routing
    kv_block_size: int | None = None
    kv_cache_blocks: int | None = None
    kv_events: bool = False
    epoch: str | None = field(default_factory=new_epoch)  # this engine's start (None: a replica that names none)
    blocks: set[int] = field(default_factory=set)
    pending: set[int] = field(default_factory=set)  # keys of requests accepted, not stored yet
    degraded: bool = False  # every frame says so: its index may miss blocks the engine holds
    silent: bool = False  # its /kv_events streams stay open and send nothing (a hung host, a dropped connection)
    frame_every_s: float = 0.2  # a frame at least this often (the contract: a load frame at least every second)
    block_keys_of: dict[str, list[int] | None] = field(default_factory=dict)  # request id -> the keys the front sent
    event_log: list[CacheEvents] = field(default_factory=list)  # every delta since start, in order
    event_streams: int = 0  # /kv_events streams open now
    event_stream_starts: int = 0
    event_stream_refusals: int = 0
    events_refused: bool = False  # ModelInfo says kv_events, but /kv_events answers 503
    load: ReplicaLoad | None = None  # the engine's load reported last
    _cut: int = 0  # bumped to end every open /kv_events stream

    def store(self, keys: list[int]) -> None:
        self.blocks.update(keys)
        self.pending.difference_update(keys)
        self.event_log.append(CacheEvents(stored=list(keys)))

    def evict(self, keys: list[int]) -> None:
        self.blocks.difference_update(keys)
        self.event_log.append(CacheEvents(removed=list(keys)))

    def announce_pending(self, keys: list[int]) -> None:
        """Keys of a request accepted (from this front or another), not stored yet."""
        new = [key for key in keys if key not in self.blocks and key not in self.pending]
        self.pending.update(new)
        self.event_log.append(CacheEvents(pending=new))

    def end_pending(self, keys: list[int]) -> None:
        ended = [key for key in keys if key in self.pending]
        self.pending.difference_update(ended)
        if ended:
            self.event_log.append(CacheEvents(unpending=ended))

    def lose_index(self) -> None:
        """Its own index starts over empty (a replay gap) while the engine keeps its blocks: a
        `cleared` frame, and every frame degraded from now on."""
        self.degraded = True
        self.event_log.append(CacheEvents(cleared=True))

    def restart(self) -> None:
        """A new engine at the same address: another epoch (if it names one), an empty cache, and
        its event streams end (as the old process's did)."""
        self.epoch = new_epoch() if self.epoch is not None else None
        self.blocks.clear()
        self.pending.clear()
        self.degraded = False
        self.cut_event_streams()

    def report_load(self, running: int = 0, waiting: int = 0, kv_usage: float = 0.0) -> None:
        self.load = ReplicaLoad(running=running, waiting=waiting, kv_usage=kv_usage)
        self.event_log.append(CacheEvents(load=self.load))

    def cut_event_streams(self) -> None:
        self._cut += 1

    async def _events(self):
        cut, position = self._cut, len(self.event_log)
        self.event_streams += 1
        self.event_stream_starts += 1
        try:
            while self.silent and cut == self._cut:  # a stream opened to a hung host: not even a snapshot
                await asyncio.sleep(0.01)
            # as LLMService's: the load reported last comes with the snapshot (a stream opened after
            # the report still learns it)
            yield encode_frame(CacheEvents(cleared=True, epoch=self.epoch, stored=sorted(self.blocks),
                                           pending=sorted(self.pending), degraded=self.degraded, load=self.load))
            sent_at = time.monotonic()
            while cut == self._cut:
                if self.silent:
                    position = len(self.event_log)
                else:
                    while position < len(self.event_log):
                        yield encode_frame(self.event_log[position].model_copy(update={"degraded": self.degraded}))
                        position += 1
                        sent_at = time.monotonic()
                    if time.monotonic() - sent_at >= self.frame_every_s:  # the load, whether it changed or not
                        yield encode_frame(CacheEvents(degraded=self.degraded, load=self.load))
                        sent_at = time.monotonic()
                await asyncio.sleep(0.01)
        finally:
            self.event_streams -= 1

    def app(self) -> Starlette:
        async def readyz(_: Request) -> PlainTextResponse:
            return PlainTextResponse("ok" if self.ready else "no", status_code=200 if self.ready else 503)

        async def model_info(_: Request) -> JSONResponse:
            info = ModelInfo(model="fake", max_model_len=CONTEXT, vocab_size=VOCAB, eos_token_ids=self.eos_token_ids,
                             adapters=self.adapters, kv_block_size=self.kv_block_size,
                             kv_cache_blocks=self.kv_cache_blocks, kv_events=self.kv_events, epoch=self.epoch)
            return JSONResponse(info.model_dump())

        async def load(_: Request) -> JSONResponse:
            return JSONResponse({"unfinished_requests": self.open_streams})

        async def generate(request: Request):
            generation = GenerateRequest.model_validate((await request.json())["request"])
            self.received.append(generation.request_id)
            self.block_keys_of[generation.request_id] = generation.block_keys
            if self.refuse_with is not None:
                return JSONResponse(["refused"], status_code=self.refuse_with, headers={"Retry-After": "1"})
            behaviour = generation.token_ids[0]
            if behaviour == Behaviour.FAIL:
                return JSONResponse({"error": "boom"}, status_code=500)
            if behaviour == Behaviour.BUSY:
                return JSONResponse({"error": "busy"}, status_code=429, headers={"Retry-After": "3"})
            if behaviour == Behaviour.INVALID:
                return JSONResponse(["the engine refused this"], status_code=400)
            if generation.adapter is not None and generation.adapter not in {a.name for a in self.adapters}:
                return JSONResponse([f"The model `{generation.adapter}` does not exist."], status_code=404)
            self.started.append(generation.request_id)
            self.adapter_of[generation.request_id] = generation.adapter
            own_engine_request(generation.request_id, self._abort)
            if self.kv_events and generation.block_keys:  # as LLMService: pending until stored or ended
                self.announce_pending(generation.block_keys)
            if self.kv_block_size is not None:  # what the engine's prefix cache would now hold
                keys = block_keys(generation.token_ids, self.kv_block_size, generation.adapter)
                if self.kv_events:
                    self.store([key for key in keys if key not in self.blocks])
                else:
                    self.blocks.update(keys)
            return StreamingResponse(self._frames(generation, behaviour), media_type="application/x-ndjson")

        async def load_lora_adapter(request: Request) -> JSONResponse:
            load = LoadAdapterRequest.model_validate((await request.json())["request"])
            if load.lora_name in {a.name for a in self.adapters}:
                return JSONResponse(AdapterUpdate(status=400, message="already loaded", type="InvalidUserInput").model_dump())
            self.adapters.append(AdapterInfo(name=load.lora_name, path=load.lora_path, parent="fake"))
            return JSONResponse(AdapterUpdate(message=f"Success: LoRA adapter '{load.lora_name}' added successfully.").model_dump())

        async def unload_lora_adapter(request: Request) -> JSONResponse:
            unload = UnloadAdapterRequest.model_validate((await request.json())["request"])
            if unload.lora_name not in {a.name for a in self.adapters}:
                return JSONResponse(AdapterUpdate(status=404, message="cannot be found", type="NotFoundError").model_dump())
            self.adapters = [a for a in self.adapters if a.name != unload.lora_name]
            return JSONResponse(AdapterUpdate(message="removed").model_dump())

        async def kv_events(_: Request):
            if not self.kv_events:
                return JSONResponse(["no KV events here"], status_code=404)
            if self.events_refused:
                self.event_stream_refusals += 1
                return JSONResponse(["the engine's events are not available"], status_code=503)
            return StreamingResponse(self._events(), media_type="application/x-ndjson")

        app = Starlette(routes=[
            Route("/kv_events", kv_events, methods=["POST"]),
            Route("/load_lora_adapter", load_lora_adapter, methods=["POST"]),
            Route("/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
            Route("/readyz", readyz), Route("/model_info", model_info, methods=["POST"]),
            Route("/load", load, methods=["POST"]), Route("/generate", generate, methods=["POST"]),
        ])
        app.add_middleware(EngineRequestsPerCall)
        app.add_middleware(JsonOnlyMiddleware)
        app.add_middleware(BearerAuthMiddleware, keys=[TOKEN], what="the internal token")
        return app

    async def _abort(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)

    async def _frames(self, generation: GenerateRequest, behaviour: int):
        n, max_tokens = generation.sampling_params.n, generation.sampling_params.max_tokens
        self.open_streams += 1
        self.peak_streams = max(self.peak_streams, self.open_streams)
        try:
            for step in range(1, max_tokens + 1):
                await asyncio.sleep(1.0 if behaviour == Behaviour.SLOW else 0.01)
                if behaviour == Behaviour.CUT and step > 2:
                    return
                last = step == max_tokens
                for index in range(n):
                    yield encode_frame(GenerateDelta(
                        index=index, token_ids=[100 + step], finish_reason="length" if last else None,
                        prompt_tokens=len(generation.token_ids), completion_tokens=step,
                    ))
            release_engine_request(generation.request_id)
        finally:
            self.open_streams -= 1
            if self.kv_events and generation.block_keys:
                self.end_pending(generation.block_keys)


class Server:
    """A uvicorn server for an ASGI app on a free loopback port, in a thread of its own."""

    def __init__(self, app) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            threading.Event().wait(0.01)
        raise TimeoutError("the test server did not start in 5 s")

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_for(condition, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


@contextmanager
def served_gpu_tier(fake: FakeGpuTier) -> Iterator[FakeGpuTier]:
    """The stand-in GPU tier on a loopback port (its `url` set while it runs)."""
    with Server(fake.app()) as server:
        fake.url = server.url
        yield fake


@contextmanager
def served_front(front) -> Iterator[Server]:
    """A front-tier app with its lifespan (so its tier monitor runs), once it sees the GPU tier ready."""
    server = Server(front)
    server.server.config.lifespan = "on"
    with server:
        wait_for(lambda: front.monitor.ready, what="the front seeing the GPU tier ready")
        yield server

