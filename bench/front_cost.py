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
import signal
import subprocess
import sys
from pathlib import Path

from bench.loadgen import Workload, run_load
from bench.metrics import summarize
from harness import Server, free_port, start_tier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder (config + tokenizer)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval-ms", type=float, default=2.0, help="the stand-in GPU tier's time between tokens")
    parser.add_argument("--profile", help="write a py-spy profile (raw format) of the worker here")
    parser.add_argument("--out", default="/tmp/front-cost", help="servers' and load generator's logs")
    args = parser.parse_args()
    model = str(Path(args.model).resolve())
    out = Path(args.out)
    gpu_port = free_port()
    gpu_tier = Server(
        "paced-gpu-tier",
        [sys.executable, "-m", "bench.paced_gpu_tier", "--port", str(gpu_port), "--interval-ms", str(args.interval_ms)],
        {}, gpu_port, out / "gpu-tier.log",
    )  # fmt: skip
    front = None
    try:
        gpu_tier.start_and_wait(60)
        front = start_tier("PromptService", log=out / "front.log", depends={"LLMService": gpu_tier.url}, ready_timeout_s=180,
                           env={"PIPELINE_MODEL": model, "PIPELINE_SERVED_MODEL_NAME": "m", "PIPELINE_PROMPT_WORKERS": "1",
                                "PIPELINE_MAX_MODEL_LEN": "4096"})  # fmt: skip
        (worker,) = front.workers()["PromptService"]
        profiler = None
        if args.profile:
            profiler = subprocess.Popen(["py-spy", "record", "-p", str(worker.pid), "-d", "25", "-r", "200", "-f", "raw",
                                         "-o", args.profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        before = worker.cpu_times()
        workload = Workload(512, 256, args.concurrency, 4 * args.concurrency)
        record = run_load(front.url, "m", model, workload, out / "load", front.pids())
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
        if front is not None:
            front.stop()
        gpu_tier.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so both servers are stopped
    main()
