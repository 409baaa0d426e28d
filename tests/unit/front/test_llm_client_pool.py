"""The front tier's client of the GPU tier holds as many streams as it is given.

A client capped at 100 connections (what httpx's default silently was, beside a transport of our
own) made a PromptService worker with more than 100 open streams queue new requests and its
readiness checks behind them: on the H100 at concurrency 256 the tier was marked down and requests
waited out their deadline (docs/benchmarks.md). A real server here, on a Unix socket as BentoML
gives it and on TCP, speaks LLMService's contract and streams slowly to 150 callers of the real
`LLMClient` at once.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from harness import free_port
from services.front.llm_client import LLMClient
from services.protocol import GenerateDelta, GenerateRequest, SamplingParams, encode_frame

STREAMS = 150  # above the 100 connections of httpx's and aiohttp's default pools


async def _slow_generate(request):
    async def frames():
        yield encode_frame(GenerateDelta(token_ids=[7], prompt_tokens=3, completion_tokens=1))
        await asyncio.sleep(60)

    return StreamingResponse(frames(), media_type="application/x-ndjson")


async def _ready(request):
    return PlainTextResponse("ok")


APP = Starlette(routes=[
    Route("/generate", _slow_generate, methods=["POST"]),
    Route("/readyz", _ready),
])  # fmt: skip


async def _streams_then_readiness(url: str, config: uvicorn.Config) -> tuple[int, float, bool]:
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    client = LLMClient(url, token="test-token-0123456789", timeout_s=30)
    first_frames = 0

    async def stream(i: int) -> None:
        nonlocal first_frames
        request = GenerateRequest(request_id=f"r{i}", token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=8))
        deadline = asyncio.get_running_loop().time() + 30
        async for _ in client.generate(request, deadline=deadline, timeout_s=30):
            first_frames += 1
            await asyncio.sleep(60)

    streams = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
    try:
        deadline = time.monotonic() + 20
        while first_frames < STREAMS and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        began = time.monotonic()
        ready = await client.is_ready(timeout_s=2.0)
        return first_frames, time.monotonic() - began, ready
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        await client.close()
        server.should_exit = True
        await serving


@pytest.mark.parametrize("scheme", ["file", "tcp"])
def test_more_streams_than_a_default_pool_and_readiness_still_answers(scheme, tmp_path):
    if scheme == "file":
        path = str(tmp_path / "llm.sock")
        url, config = f"file://{path}", uvicorn.Config(APP, uds=path, log_level="warning")
    else:
        port = free_port()
        url, config = f"tcp://127.0.0.1:{port}", uvicorn.Config(APP, host="127.0.0.1", port=port, log_level="warning")
    first_frames, check_s, ready = asyncio.run(_streams_then_readiness(url, config))
    assert first_frames == STREAMS, f"only {first_frames} of {STREAMS} streams got their first frame"
    assert ready and check_s < 1.0, f"readiness answered {ready} after {check_s:.2f} s beside {STREAMS} streams"
