"""CPU time the GPU tier's process (LLMService) spends per output token, under a BentoML config.

    python -m bench.tier_cost MODEL_DIR [BENTOML_CONFIG_FILE]

Serves the pipeline (dummy weights, CPU engine), drives it with `vllm bench serve` through
bench/loadgen.py, and divides the LLMService worker's CPU time (user + system, so a busy machine
distorts it little) by the output tokens. With a config file such as
`services: {LLMService: {tracing: {excluded_urls: ["generate"]}}}` it shows what BentoML's
per-chunk tracing costs in the real tier.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from bench.loadgen import Workload, run_load
from bench.metrics import summarize
from harness import EngineSettings, free_port, make_server


def main() -> None:
    model, config = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    port = free_port()
    settings = EngineSettings(model=str(Path(model).resolve()), served_name="m", max_model_len=2048,
                              load_format="dummy", enforce_eager=True, cpu=True, cpu_kvcache_gib=1)  # fmt: skip
    out = Path(f"/tmp/tier-cost-{'config' if config else 'default'}")
    server = make_server("pipeline", settings, port, out, prompt_workers=2)
    if config:
        server.env["BENTOML_CONFIG"] = str(Path(config).resolve())
    server.start_and_wait(900)
    try:
        (llm,) = server.workers()["LLMService"]
        workload = Workload(input_len=64, output_len=64, concurrency=16, num_prompts=48)
        # the process's CPU while idle (event loop, engine polling): subtracted below, since on a
        # slow engine it is most of the total
        idle0, t0 = llm.cpu_times(), time.monotonic()
        time.sleep(20)
        idle1, t1 = llm.cpu_times(), time.monotonic()
        idle_rate = ((idle1.user + idle1.system) - (idle0.user + idle0.system)) / (t1 - t0)
        before, start = llm.cpu_times(), time.monotonic()
        record = run_load(server.url, "m", settings.model, workload, out / "load", server.pids())
        after, seconds = llm.cpu_times(), time.monotonic() - start
        figures = summarize(record)
        tokens = sum(n for n, e in zip(record["requests"]["output_len"], record["requests"]["error"]) if not e)
        cpu = (after.user + after.system) - (before.user + before.system)
        busy = cpu - idle_rate * seconds
        print(json.dumps({"config": config, "output_tokens": tokens, "failed": figures["failed"], "load_s": round(seconds, 1),
                          "llmservice_cpu_s": round(cpu, 3), "idle_cpu_per_s": round(idle_rate, 4),
                          "llmservice_cpu_us_per_token": round(1e6 * cpu / max(tokens, 1), 1),
                          "above_idle_us_per_token": round(1e6 * busy / max(tokens, 1), 1),
                          "tokens_per_chunk": round(figures["tokens_per_chunk"], 2)}), flush=True)  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the served tiers are stopped
    main()
