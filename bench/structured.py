"""The first token of a JSON-schema request: the pipeline against `vllm serve`, same model and
engine settings, one request at a time (the grammar's compile time is part of the time to first
token). Three kinds of streamed chat request, `--requests` of each, in turn: `plain`, `schema,
cached` (the same schema every time) and `schema, new` (a schema never seen before).

    python -m bench structured --cpu --requests 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from bench import cli
from bench.datasets import PERSON_QUESTION, person_schema
from bench.machine import describe_machine
from bench.results import finish, log, results_folder, write_json
from harness import free_port, make_server

KINDS = ("plain", "schema, cached", "schema, new")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_engine(parser, max_model_len=2048, dtype="auto", prompt_workers=1, cpu_kvcache_gib=1)
    cli.add_output(parser)
    cli.add_targets(parser, ["pipeline", "vllm"])
    parser.add_argument("--requests", type=int, default=20, help="requests of each kind, per server")
    parser.add_argument("--max-tokens", type=int, default=8)


def body(kind: str, i: int, model: str, max_tokens: int) -> dict:
    request = {"model": model, "messages": PERSON_QUESTION, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    if kind != "plain":
        field = "city" if kind == "schema, cached" else f"city_{i}_{time.monotonic_ns()}"
        request["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": person_schema(field)}}
    return request


def first_token_s(http: httpx.Client, url: str, request: dict) -> float:
    started = time.perf_counter()
    with http.stream("POST", url + "/v1/chat/completions", json=request) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                return time.perf_counter() - started
    raise RuntimeError(f"no content from {url}")


def run(args: argparse.Namespace) -> int:
    out = results_folder(args.out, "structured")
    settings = cli.engine_settings(args)
    write_json(out / "meta.json", {"question": "structured", "machine": describe_machine(), "engine": settings.__dict__,
                                   "targets": args.targets, "label": args.label})
    name, n = settings.served_name, args.max_tokens
    results: dict[str, dict[str, list[float]]] = {}
    for target in args.targets:  # one at a time: two engines on a small machine slow each other down
        server = make_server(target, settings, free_port(), out / "logs", prompt_workers=args.prompt_workers)
        results[target] = {kind: [] for kind in KINDS}
        try:
            server.start()
            log(f"{target} ready after {server.wait_ready(args.ready_timeout):.0f} s")
            with httpx.Client(timeout=120) as http:
                for kind in KINDS:  # warm-up, not measured (the first grammar also sets up the backend)
                    first_token_s(http, server.url, body(kind, -1, name, n))
                for i in range(args.requests):
                    for kind in KINDS:
                        results[target][kind].append(first_token_s(http, server.url, body(kind, i, name, n)))
        finally:
            server.stop()

    summary = {}
    for target, by_kind in results.items():
        plain = statistics.median(by_kind["plain"])
        summary[target] = {
            kind: {"median_ms": round(statistics.median(t) * 1000, 1), "best_ms": round(min(t) * 1000, 1),
                   "p90_ms": round(statistics.quantiles(t, n=10)[-1] * 1000, 1) if len(t) > 1 else round(t[0] * 1000, 1),
                   "over_plain_ms": round((statistics.median(t) - plain) * 1000, 1)}
            for kind, t in by_kind.items()
        }
    write_json(out / "summary.json", {"requests_per_kind": args.requests, "summary": summary, "samples_s": results})
    print(json.dumps(summary, indent=1))
    return finish(out, args.label, 0)
