"""LoRA adapters: what a request on an adapter costs next to one on the base model, and a mixed
burst of three adapters. Three rank-8 adapters are made for the model (bench/lora_adapters.py);
the pipeline is started with them (PIPELINE_LORA_MODULES) and, as the reference, without LoRA.
Every request is a streamed /v1/completions, greedy, `--output-tokens` tokens with ignore_eos.

    python -m bench lora --cpu --repeats 5 --concurrency 16 --requests 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from bench import cli
from bench.datasets import LORA_PROMPT
from bench.lora_adapters import make_adapter
from bench.machine import describe_machine
from bench.results import finish, results_folder, write_json
from harness import EngineSettings, free_port, make_server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_engine(parser, max_model_len=2048, dtype="auto", prompt_workers=1, cpu_kvcache_gib=1)
    cli.add_output(parser)
    group = parser.add_argument_group("requests")
    group.add_argument("--repeats", type=int, default=5, help="one at a time: requests per model, alternating")
    group.add_argument("--concurrency", type=int, default=16, help="the burst's concurrency")
    group.add_argument("--requests", type=int, default=48, help="the burst's requests")
    group.add_argument("--output-tokens", type=int, default=64)
    group.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                       help="also the pipeline without LoRA, for the base model's figures")


async def one(http: httpx.AsyncClient, model: str, output_tokens: int) -> dict:
    """One streamed completion: time to first token, time per output token after it, tokens."""
    body = {"model": model, "prompt": LORA_PROMPT, "max_tokens": output_tokens, "ignore_eos": True, "temperature": 0,
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


async def sequential(url: str, models: list[str], repeats: int, output_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for model in models:  # warm-up: the adapter's first use loads it into the engine's slots
            await one(http, model, output_tokens)
        results = {model: [] for model in models}
        for _ in range(repeats):
            for model in models:
                results[model].append(await one(http, model, output_tokens))
    return {model: summarize(runs, None) for model, runs in results.items()}


async def burst(url: str, models: list[str], concurrency: int, requests: int, output_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        queue = list(range(requests))
        runs: list[dict] = []

        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                runs.append(await one(http, models[i % len(models)], output_tokens))

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


def run_server(settings: EngineSettings, env: dict, name: str, out: Path, args: argparse.Namespace, work) -> dict:
    """The pipeline (one front worker, one engine client) with `env`, while `work(url)` runs."""
    server = make_server("pipeline-ec1", settings, free_port(), out / "logs", prompt_workers=args.prompt_workers)
    server.name, server.log = name, out / "logs" / f"{name}.log"
    server.env |= env
    server.start_and_wait(args.ready_timeout)
    try:
        return asyncio.run(work(server.url)) | {"ready_after_s": round(server.ready_after_s or 0, 1)}
    finally:
        server.stop()


def run(args: argparse.Namespace) -> int:
    out = results_folder(args.out, "lora")
    settings = cli.engine_settings(args)
    base, n = settings.served_name, args.output_tokens
    adapters = {name: make_adapter(settings.model, out / "adapters" / name, seed=seed)
                for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    lora_env = {"PIPELINE_LORA_MODULES": " ".join(f"{name}={path}" for name, path in adapters.items()),
                "PIPELINE_MAX_LORAS": "4", "PIPELINE_MAX_LORA_RANK": "8"}
    machine = describe_machine()
    write_json(out / "meta.json", {"question": "lora", "machine": machine, "engine": settings.__dict__, "label": args.label})

    async def with_lora(url: str) -> dict:
        return {
            "one_at_a_time": await sequential(url, [base, "a"], args.repeats, n),
            "burst_three_adapters": await burst(url, ["a", "b", "c"], args.concurrency, args.requests, n),
            "burst_base": await burst(url, [base], args.concurrency, args.requests, n),
        }

    async def without_lora(url: str) -> dict:
        return {
            "one_at_a_time": await sequential(url, [base], args.repeats, n),
            "burst_base": await burst(url, [base], args.concurrency, args.requests, n),
        }

    results = {
        "what": f"streamed /v1/completions, greedy, ignore_eos; one 20-token prompt, {n} output "
                "tokens; rank-8 adapters on q_proj and v_proj; the pipeline (bentoml serve, 1 front worker, 1 engine "
                "client); sequential: base and adapter requests alternate, after one warm-up each",
        "machine": machine,
        "lora_pipeline": run_server(settings, lora_env, "lora", out, args, with_lora),
    }
    if args.reference:
        results["no_lora_pipeline"] = run_server(settings, {}, "no-lora", out, args, without_lora)
    write_json(out / "summary.json", results)
    print(json.dumps(results, indent=2))
    return finish(out, args.label, 0)
