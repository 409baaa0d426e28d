"""Measure what a newcomer sees: `./scripts/serve.sh` to ready, each service's memory, and the
time to first token through both tiers. Writes JSON (stdout, and --out if given).

    .venv/bin/python scripts/measure_serve.py [--out docs/benchmarks/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 900) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"serve.sh exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=3).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("not ready")


def service_memory(root_pid: int) -> dict[str, float]:
    """Resident memory (MiB) of each service: its worker process and everything under it."""
    memory: dict[str, float] = {}
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            args = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "--service-name" in args and "_bentoml_impl.worker.service" in " ".join(args):
            name = args[args.index("--service-name") + 1]
            tree = [process, *process.children(recursive=True)]
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
    args = parser.parse_args()
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "serve.sh")],
        cwd=ROOT,
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_ready(url, process)
        result = {
            "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
            "load_average_1m_at_start": os.getloadavg()[0],
            "serve_sh_to_ready_s": round(ready_s, 1),
            "memory_mib": service_memory(process.pid),
            **first_token_ms(url),
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    result["wall_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
