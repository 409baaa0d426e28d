"""CPU time one PromptService worker spends per output token, at GPU token rates, without a GPU.

    python -m bench.front_cost MODEL_DIR [--concurrency 16] [--interval-ms 2] [--profile OUT.txt]

Starts bench/paced_gpu_tier.py in place of LLMService and PromptService alone with one worker
pointed at it (BentoML's per-service start with `--depends`), drives it with `vllm bench serve`
(chat, 512 tokens in, 256 out) through bench/loadgen.py, and divides the worker's CPU time by the
output tokens. With --profile, py-spy samples the worker meanwhile (raw format, one line a stack).
docs/benchmarks.md reads the results.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from bench.loadgen import Workload, run_load
from bench.metrics import summarize

REPO = Path(__file__).resolve().parent.parent
FRONT_PORT, GPU_TIER_PORT = 3100, 3101


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder (config + tokenizer)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval-ms", type=float, default=2.0, help="the stand-in GPU tier's time between tokens")
    parser.add_argument("--profile", help="write a py-spy profile (raw format) of the worker here")
    parser.add_argument("--out", default="/tmp/front-cost", help="load generator logs")
    args = parser.parse_args()
    model = str(Path(args.model).resolve())
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "PIPELINE_MODEL": model,
           "PIPELINE_SERVED_MODEL_NAME": "m", "PIPELINE_PROMPT_WORKERS": "1", "PIPELINE_MAX_MODEL_LEN": "4096"}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_tier = subprocess.Popen(
        [sys.executable, "-m", "bench.paced_gpu_tier", "--port", str(GPU_TIER_PORT), "--interval-ms", str(args.interval_ms)],
        cwd=REPO, env=env, start_new_session=True,
    )  # fmt: skip
    front = subprocess.Popen(
        [sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server", ".", "--service-name", "PromptService",
         "--host", "127.0.0.1", "--port", str(FRONT_PORT), "--depends", f"LLMService=http://127.0.0.1:{GPU_TIER_PORT}"],
        cwd=REPO, env=env, stdout=(out / "front.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{FRONT_PORT}/readyz", front, timeout_s=180)
        worker = next(p for p in psutil.Process(front.pid).children(recursive=True) if "_bentoml_impl.worker" in " ".join(p.cmdline()))
        profiler = None
        if args.profile:
            profiler = subprocess.Popen(["py-spy", "record", "-p", str(worker.pid), "-d", "25", "-r", "200", "-f", "raw",
                                         "-o", args.profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        before = worker.cpu_times()
        workload = Workload(512, 256, args.concurrency, 4 * args.concurrency)
        record = run_load(f"http://127.0.0.1:{FRONT_PORT}", "m", model, workload, out / "load", [front.pid, worker.pid])
        after = worker.cpu_times()
        figures = summarize(record)
        tokens = sum(n for n, e in zip(record["requests"]["output_len"], record["requests"]["error"]) if not e)
        cpu_s = (after.user + after.system) - (before.user + before.system)
        print(json.dumps({
            "concurrency": args.concurrency, "interval_ms": args.interval_ms, "ok": figures["completed"],
            "failed": figures["failed"], "output_tok_per_s": round(figures["output_throughput"]),
            "front_cpu_us_per_token": round(1e6 * cpu_s / max(tokens, 1), 1),
            "tokens_per_chunk": round(figures["tokens_per_chunk"], 2), "ttft_p50_ms": round(figures["ttft_p50_ms"], 1),
            "itl_p50_ms": round(figures["itl_p50_ms"], 2),
        }), flush=True)  # fmt: skip
        if profiler:
            profiler.wait()
    finally:
        for process in (front, gpu_tier):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in (front, gpu_tier):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"PromptService exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"PromptService not ready after {timeout_s} s")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so both servers are stopped
    main()
