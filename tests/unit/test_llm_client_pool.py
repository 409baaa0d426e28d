"""The front tier's HTTP client to the GPU tier holds as many streams as it is given.

A pool capped at httpx's default of 100 connections (what `limits` on a client given its own
transport silently leaves) made a PromptService worker with more than 100 open streams queue new
requests and its readiness checks behind them: on the H100 at concurrency 256 the tier was marked
down and requests waited out their deadline (docs/benchmarks.md). A real server here, on a Unix
socket as BentoML gives it and on TCP, streams slowly to 150 callers at once.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from services.llm_client import http_client

STREAMS = 150  # above httpx's default cap of 100 connections


async def _slow_stream(request):
    async def body():
        yield b"first\n"
        await asyncio.sleep(60)

    return StreamingResponse(body())


async def _ready(request):
    return PlainTextResponse("ok")


APP = Starlette(routes=[Route("/generate", _slow_stream, methods=["POST"]), Route("/readyz", _ready)])


async def _open_streams_then_check(url: str, config: uvicorn.Config) -> tuple[int, float, int]:
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    http = http_client(url, timeout_s=30)
    started = 0

    async def stream() -> None:
        nonlocal started
        async with http.stream("POST", "/generate") as response:
            async for _ in response.aiter_bytes():
                started += 1
                await asyncio.sleep(60)

    streams = [asyncio.create_task(stream()) for _ in range(STREAMS)]
    try:
        deadline = time.monotonic() + 20
        while started < STREAMS and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        began = time.monotonic()
        ready = await http.get("/readyz", timeout=2.0)
        return started, time.monotonic() - began, ready.status_code
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        await http.aclose()
        server.should_exit = True
        await serving


@pytest.mark.parametrize("scheme", ["file", "tcp"])
def test_more_streams_than_httpx_default_cap_and_readiness_still_answers(scheme, tmp_path):
    if scheme == "file":
        path = str(tmp_path / "llm.sock")
        url, config = f"file://{path}", uvicorn.Config(APP, uds=path, log_level="warning")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url, config = f"tcp://127.0.0.1:{port}", uvicorn.Config(APP, host="127.0.0.1", port=port, log_level="warning")
    started, check_s, status = asyncio.run(_open_streams_then_check(url, config))
    assert started == STREAMS, f"only {started} of {STREAMS} streams got their first frame"
    assert status == 200 and check_s < 1.0, f"readiness answered {status} after {check_s:.2f} s beside {STREAMS} streams"
