"""Measure what a newcomer sees: `./scripts/serve.sh` to ready, each service's memory, and the
time to first token through both tiers. Writes JSON (stdout, and --out if given).

    .venv/bin/python scripts/measure_serve.py [--out docs/benchmarks/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import Server, free_port  # noqa: E402


def service_memory(server: Server) -> dict[str, float]:
    """Resident memory (MiB) of each service: its worker process and everything under it."""
    memory: dict[str, float] = {}
    for name, workers in server.workers().items():
        tree = [p for worker in workers for p in (worker, *worker.children(recursive=True))]
        memory[name] = round(sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
    return memory


def first_token_ms(url: str, runs: int = 5) -> dict[str, float]:
    body = {"prompt": "What is the capital of France?", "temperature": 0, "max_tokens": 32}
    ttft, total = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(runs + 1):  # the first is a warm-up
            started = time.perf_counter()
            with client.stream("POST", "/generate", json=body) as response:
                chunks = response.iter_text()
                next(chunks)
                first = time.perf_counter()
                for _ in chunks:
                    pass
            ttft.append((first - started) * 1000)
            total.append((time.perf_counter() - started) * 1000)
    return {"ttft_ms_p50": round(statistics.median(ttft[1:]), 1), "request_ms_p50": round(statistics.median(total[1:]), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--log", type=Path, default=ROOT / ".cache" / "measure-serve.log", help="serve.sh's output")
    args = parser.parse_args()
    port = free_port()
    server = Server("serve.sh", [str(ROOT / "scripts" / "serve.sh"), "--host", "127.0.0.1"], {"PORT": str(port)}, port, args.log)
    started = time.monotonic()
    try:
        server.start_and_wait(900)
        result = {
            "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
            "load_average_1m_at_start": os.getloadavg()[0],
            "serve_sh_to_ready_s": round(server.ready_after_s, 1),
            "memory_mib": service_memory(server),
            **first_token_ms(server.url),
        }
    finally:
        server.stop()
    result["wall_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
