"""Server CPU time per streamed chunk through BentoML, for each configuration variant.

    python -m bench.chunk_cost 0 1 2 3

Starts bench/chunk_stream_service.py (one worker) per variant (see its docstring), streams 16 x 3000
lines of 77 bytes concurrently, and divides the worker's CPU time (user + system) by the lines
sent. CPU time, not wall time, so a busy machine distorts it little.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import psutil

from harness import Server, free_port

HERE = Path(__file__).resolve().parent


async def drive(base_url: str, worker: psutil.Process, lines: int, streams: int) -> dict:
    async def one(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/stream", json={"n": lines}) as response:
            response.raise_for_status()
            async for _ in response.aiter_raw():
                pass

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        await one(client)  # warm-up
        before, start = worker.cpu_times(), time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(streams)))
        after, wall = worker.cpu_times(), time.perf_counter() - start
    cpu = (after.user + after.system) - (before.user + before.system)
    return {"chunks": lines * streams, "server_cpu_s": round(cpu, 3), "wall_s": round(wall, 2),
            "server_cpu_us_per_chunk": round(1e6 * cpu / (lines * streams), 1)}  # fmt: skip


def measure(variant: str, lines: int = 3000, streams: int = 16) -> dict:
    port = free_port()
    argv = [
        sys.executable, "-m", "bentoml", "serve", "chunk_stream_service:ChunkStream",
        "--working-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    server = Server("chunks", argv, {"CHUNK_VARIANT": variant}, port, Path(f"/tmp/chunk-cost-{variant}.log"))
    server.start_and_wait(300)
    try:
        (worker,) = server.workers()["ChunkStream"]
        return asyncio.run(drive(server.url, worker, lines, streams))
    finally:
        server.stop()


if __name__ == "__main__":
    for variant in sys.argv[1:] or ["0", "1"]:
        print(f"variant {variant}: {measure(variant)}", flush=True)
