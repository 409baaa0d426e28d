"""First-token cost of a JSON-schema request: the pipeline against `vllm serve`, same model and
engine settings, one request at a time (the grammar's compile time is part of the time to first
token).

    python -m bench.structured_ttft --model DIR --out docs/benchmarks/structured-ttft-cpu.json

One server at a time (two engines on a small CPU machine slow each other down), three kinds of
streamed chat request, `--requests` of each, in turn:
`plain` (no grammar), `schema, cached` (the same JSON schema every time: vLLM compiles it once and
reuses it), `schema, new` (a schema never seen before, a new property name each time: compiled for
this request). Reported: median, best and p90 time to the first content token, and the median's
cost over `plain` on the same server. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from harness import EngineSettings, free_port, make_server

QUESTION = [{"role": "user", "content": "Invent a person: a name, an age and a city."}]


def schema(field: str) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["name", "age", field],
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, field: {"type": "string"}}}


def body(kind: str, i: int, model: str) -> dict:
    request = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 8, "stream": True}
    if kind != "plain":
        field = "city" if kind == "schema, cached" else f"city_{i}_{time.monotonic_ns()}"
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema(field)}}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local model folder")
    parser.add_argument("--served-name", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, default=Path(".cache/bench-structured"))
    args = parser.parse_args()

    settings = EngineSettings(model=args.model, served_name=args.served_name, max_model_len=2048, dtype="auto",
                              enforce_eager=True, cpu=True, cpu_kvcache_gib=1)
    kinds = ("plain", "schema, cached", "schema, new")
    results: dict[str, dict[str, list[float]]] = {}
    for target in ("pipeline", "vllm"):
        server = make_server(target, settings, free_port(), args.logs, prompt_workers=1)
        results[target] = {kind: [] for kind in kinds}
        try:
            server.start()
            print(f"{target} ready after {server.wait_ready(600):.0f} s", file=sys.stderr)
            with httpx.Client(timeout=120) as http:
                for kind in kinds:  # warm-up, not measured (the first grammar also sets up the backend)
                    first_token_s(http, server.base_url, body(kind, -1, args.served_name))
                for i in range(args.requests):
                    for kind in kinds:
                        results[target][kind].append(first_token_s(http, server.base_url, body(kind, i, args.served_name)))
        finally:
            server.stop()

    summary = {}
    for name, by_kind in results.items():
        plain = statistics.median(by_kind["plain"])
        summary[name] = {
            kind: {"median_ms": round(statistics.median(t) * 1000, 1), "best_ms": round(min(t) * 1000, 1),
                   "p90_ms": round(statistics.quantiles(t, n=10)[-1] * 1000, 1),
                   "over_plain_ms": round((statistics.median(t) - plain) * 1000, 1)}
            for kind, t in by_kind.items()
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"requests_per_kind": args.requests, "summary": summary, "samples_s": results}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
