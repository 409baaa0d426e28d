"""LoRA adapters on the CPU engine: what a request on an adapter costs next to one on the base model,
and a mixed burst of three adapters (issue 14). Results: docs/benchmarks/lora-cpu.json.

Three rank-8 adapters (q_proj, v_proj) are made for the default model (bench/lora_adapters.py),
and the pipeline (`bentoml serve`, one front worker) is started twice: with the adapters
(PIPELINE_LORA_MODULES, PIPELINE_MAX_LORAS=4) and without LoRA, the reference for the base model.
Every request is a streamed /v1/completions, greedy, 64 tokens with ignore_eos, on a 20-token prompt:

- one request at a time (after a warm-up): time to first token and decode rate, base vs adapter;
- 16 at once (c=16), 48 requests, each on the next of the three adapters in turn, against the
  same burst on the base model: output tokens per second, TTFT and time per output token.

Run it alone, under the engine lock:  flock "${ENGINE_LOCK:-${TMPDIR:-/tmp}/llm-pipeline-engine.lock}" python -m bench.lora_bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.lora_adapters import default_model_folder, make_adapter
from bench.machine import describe_machine
from harness import ROOT, own_bentoml_home, serve_pipeline

MODEL = "smollm2-135m-instruct"
PROMPT = "The history of the bicycle spans more than two centuries. Early designs had no pedals and were pushed"
OUTPUT_TOKENS = 64


async def one(http: httpx.AsyncClient, model: str) -> dict:
    """One streamed completion: time to first token, time per output token after it, tokens."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(choice.get("text") for choice in chunk["choices"]):
                first = time.perf_counter()
    done = time.perf_counter()
    first = first or done
    return {"ttft_s": first - started, "tpot_s": (done - first) / max(tokens - 1, 1), "tokens": tokens,
            "e2e_s": done - started}


async def sequential(url: str, models: list[str], repeats: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for model in models:  # warm-up: the adapter's first use loads it into the engine's slots
            await one(http, model)
        results = {model: [] for model in models}
        for _ in range(repeats):
            for model in models:
                results[model].append(await one(http, model))
    return {model: summarize(runs, None) for model, runs in results.items()}


async def burst(url: str, models: list[str], concurrency: int, requests: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        queue = list(range(requests))
        runs: list[dict] = []

        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                runs.append(await one(http, models[i % len(models)]))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return summarize(runs, wall) | {"models": models, "concurrency": concurrency, "requests": requests}


def summarize(runs: list[dict], wall_s: float | None) -> dict:
    ttft = sorted(r["ttft_s"] for r in runs)
    tpot = sorted(r["tpot_s"] for r in runs)
    out = {
        "requests": len(runs),
        "ttft_ms_p50": round(1000 * statistics.median(ttft), 1),
        "ttft_ms_p90": round(1000 * ttft[int(0.9 * (len(ttft) - 1))], 1),
        "tpot_ms_p50": round(1000 * statistics.median(tpot), 2),
        "decode_tok_s_p50": round(1 / statistics.median(tpot), 1),
    }
    if wall_s is not None:
        tokens = sum(r["tokens"] for r in runs)
        out |= {"wall_s": round(wall_s, 2), "output_tokens": tokens, "output_tok_s": round(tokens / wall_s, 1)}
    return out


def run_server(env: dict, name: str, work) -> dict:
    logs = ROOT / ".cache" / "bench-logs"
    server = serve_pipeline(log=logs / f"{name}.log", env={"BENTOML_HOME": own_bentoml_home(logs / name),
                                                           "PIPELINE_PROMPT_WORKERS": "1", "PIPELINE_ENGINE_CLIENTS": "1", **env})
    try:
        return asyncio.run(work(server.url)) | {"ready_after_s": round(server.ready_after_s or 0, 1)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "lora-cpu.json")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    base = default_model_folder()
    adapters = {name: make_adapter(base, folder / name, seed=seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    lora_env = {"PIPELINE_LORA_MODULES": " ".join(f"{name}={path}" for name, path in adapters.items()),
                "PIPELINE_MAX_LORAS": "4", "PIPELINE_MAX_LORA_RANK": "8"}

    async def with_lora(url: str) -> dict:
        return {
            "one_at_a_time": await sequential(url, [MODEL, "a"], args.repeats),
            "burst_three_adapters": await burst(url, ["a", "b", "c"], args.concurrency, args.requests),
            "burst_base": await burst(url, [MODEL], args.concurrency, args.requests),
        }

    async def without_lora(url: str) -> dict:
        return {
            "one_at_a_time": await sequential(url, [MODEL], args.repeats),
            "burst_base": await burst(url, [MODEL], args.concurrency, args.requests),
        }

    results = {
        "what": "streamed /v1/completions, greedy, ignore_eos; prompt 20 tokens, 64 output tokens; rank-8 adapters on "
                "q_proj and v_proj; the pipeline (bentoml serve, 1 front worker, 1 engine client), float32 CPU engine, eager; "
                "sequential: base and adapter requests alternate, after one warm-up each",
        "machine": describe_machine(),
        "lora_pipeline": run_server(lora_env, "lora-bench-lora", with_lora),
        "no_lora_pipeline": run_server({}, "lora-bench-plain", without_lora),
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
