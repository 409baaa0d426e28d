"""A new replica's start: LLMService alone (its per-tier start, as a container per tier runs it)
against `vllm serve`, same model and engine settings, from a cold compile cache and a warm one.
Each start is one record in starts.jsonl (ready, first token, the breakdown by phase from
bench/startup_log.py); `--serve-sh` measures instead what a newcomer sees from ./scripts/serve.sh.

    python -m bench startup --cpu --targets pipeline-ec2 --plan warm warm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import psutil

from bench import cli
from bench.datasets import SHORT_PROMPT, startup_prompt
from bench.machine import describe_machine
from bench.results import finish, log, results_folder, write_json
from bench.startup_log import breakdown, client_phases, follow, phases, watch_processes
from harness import (
    ROOT,
    EngineSettings,
    Server,
    cpu_engine_env,
    free_port,
    make_server,
    parse_target,
    pipeline_command,
    poll,
    tier_command,
    tier_env,
)
from services.gpu.caches import cache_environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_engine(parser)
    cli.add_output(parser)
    cli.add_targets(parser, ["pipeline-ec8", "vllm-api8"])
    group = parser.add_argument_group("starts")
    group.add_argument("--plan", nargs="+", choices=["cold", "warm"], default=["cold", "warm", "warm"],
                       help="one round per entry: cold empties each server's caches first, warm keeps them")
    group.add_argument("--first", type=int, default=0, help="the target (index) that goes first in round 1")
    group.add_argument("--prompt-len", type=int, default=512)
    group.add_argument("--max-tokens", type=int, default=16)
    group.add_argument("--next-requests", type=int, default=5, help="requests after the first, for its pace")
    group.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                       help="run each pipeline target from this source tree too, as TARGET@LABEL (repeatable)")
    group.add_argument("--serve-sh", action="store_true", help="instead: ./scripts/serve.sh to ready, each "
                       "service's memory and the first token through both tiers (serve-sh.json)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.model and not args.cpu and not args.serve_sh:
        parser.error("--model is needed (without it only --cpu runs: LLMService as the tests start it)")


def llm_service(settings: EngineSettings | None, engine_clients: int | None, port: int, log: Path, home: Path,
                cache: Path, tree: Path = ROOT) -> Server:
    """LLMService alone, started as its container starts it (start-http-server), from the source
    tree `tree`. Without `settings`: as the tests start it (harness.start_tier)."""
    if settings is None:
        env = tier_env(**({"PIPELINE_ENGINE_CLIENTS": str(engine_clients)} if engine_clients else {}))
        return Server("LLMService", tier_command("LLMService", port), env, port, log, cwd=tree)
    _, env = pipeline_command(settings, port, prompt_workers=1, engine_clients=engine_clients)
    home.mkdir(parents=True, exist_ok=True)  # its own (metrics folder); the model is a folder, not in the store
    env |= {"PIPELINE_CACHE_DIR": str(cache), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    return Server("LLMService", tier_command("LLMService", port), env, port, log, cwd=tree)


def make(target: str, settings: EngineSettings | None, out: Path, cache: Path, run: str,
         trees: dict[str, Path] | None = None) -> Server:
    port = free_port()
    log = out / "logs" / f"{run}.log"
    target, _, label = target.partition("@")
    kind, count = parse_target(target)
    if kind == "pipeline":
        tree = (trees or {}).get(label, ROOT) if label else ROOT
        return llm_service(settings, count, port, log, cache.parent / f"{target}-bentoml-home", cache, tree)
    if settings is None:
        raise ValueError(f"{target} needs --model")
    server = make_server(target, settings, port, out / "logs")
    server.log = log
    server.env |= cache_environment(cache) | cpu_engine_env(settings)
    return server


def stream_first_token(server: Server, settings: EngineSettings, prompt: list[int], max_tokens: int,
                       timeout_s: float = 120) -> tuple[float, int]:
    """Send one request; (seconds to its first token, tokens received)."""
    started = time.perf_counter()
    first = None
    tokens = 0
    if server.name == "LLMService":
        body = {"request": {"request_id": uuid.uuid4().hex, "token_ids": prompt, "stream": True,  # the API's one argument
                            "sampling_params": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}}}
        with server.llm_tier(timeout_s) as http, http.stream("POST", "/generate", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.strip() and json.loads(line).get("token_ids"):
                    first = first or time.perf_counter()
                    tokens += len(json.loads(line)["token_ids"])
    else:
        body = {"model": settings.served_name, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0}
        with server.client(timeout_s) as http, http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    first = first or time.perf_counter()
                    tokens += 1
    if first is None:
        raise RuntimeError(f"{server.name}: no token in the reply")
    return first - started, tokens


def gpu_memory_used_mib() -> int | None:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return max((int(v) for v in text.split()), default=None)


def wait_gpu_free(within_s: float = 60, below_mib: int = 2048) -> None:
    """Until the GPU's memory is free again (the previous server's processes gone), so that the
    next engine's start-up memory check and profile see an empty card."""
    poll(gpu_memory_used_mib, lambda used: used is None or used < below_mib, within_s, every_s=0.5)


def measure(server: Server, settings: EngineSettings | None, prompt: list[int], args) -> dict:
    wait_gpu_free()
    started_at = time.time()
    server.start()
    clients = None
    try:
        with follow(server.log) as arrivals, watch_processes(server.process.pid) as processes:
            ready = server.wait_ready(args.ready_timeout)
            print(f"  ready after {ready:.1f} s", flush=True)
            ttft, tokens = stream_first_token(server, settings, prompt, args.max_tokens)
            following = [stream_first_token(server, settings, prompt[1:] + prompt[:1], args.max_tokens)[0]
                         for _ in range(args.next_requests)]
            if server.name == "LLMService":  # /readyz answered from one worker: the others' lines may come later
                count = int(server.environment().get("PIPELINE_ENGINE_CLIENTS") or 1)
                clients = poll(lambda: client_phases(arrivals, started_at),
                               lambda seen: len(seen["clients_connected"]) >= count, within_s=30, every_s=0.2)
                if "engine_ready" in clients:
                    clients["ready_after_engine_s"] = round(ready - clients["engine_ready"], 2)
        steps = breakdown(arrivals, processes, started_at, ready)
    finally:
        server.stop()
    return {
        "breakdown": steps,
        "ready_s": round(ready, 2),
        "live_s": server.live_after_s and round(server.live_after_s, 2),
        "first_token_s": round(ready + ttft, 2),
        "ttft_first_ms": round(ttft * 1000, 1),
        "ttft_next_ms": round(statistics.median(following) * 1000, 1) if following else None,
        "tokens": tokens,
        "started_at": started_at,
        "phases": phases(server.log.read_text(errors="replace"), started_at),
        **({"clients": clients} if clients is not None else {}),
    }


def run(args: argparse.Namespace) -> int:
    out = results_folder(args.out, "startup")
    if args.serve_sh:
        return serve_sh(out)
    trees = {label: Path(folder).resolve() for label, _, folder in (tree.partition("=") for tree in args.tree)}
    settings = cli.engine_settings(args) if args.model else None
    targets = [f"{target}@{label}" if trees and parse_target(target)[0] == "pipeline" else target
               for target in args.targets for label in (trees or [""])]
    targets = list(dict.fromkeys(targets))  # a vllm target once, whatever the trees
    write_json(out / "meta.json", {
        "question": "startup", "machine": describe_machine(), "label": args.label,
        "engine": settings.__dict__ if settings else "the test tiers' (harness.tier_env)",
        "targets": targets, "trees": {label: str(folder) for label, folder in trees.items()}, "plan": args.plan})
    prompt = startup_prompt(args.prompt_len)
    order = targets[args.first:] + targets[:args.first]
    status = 0
    for round_index, kind in enumerate(args.plan, 1):
        for target in order:
            cache = Path(args.caches or out / "caches") / target
            if kind == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            name = f"{round_index:02d}-{kind}-{target}"
            log(f"{name} starts")
            record = {"run": name, "round": round_index, "cache": kind, "target": target}
            try:
                record |= measure(make(target, settings, out, cache, name, trees), settings, prompt, args)
            except Exception as error:  # noqa: BLE001 - recorded, and the next start goes on
                record["error"] = f"{type(error).__name__}: {error}"[-3000:]
                status = 1
            with (out / "starts.jsonl").open("a") as file:
                file.write(json.dumps(record) + "\n")
            brief = {k: record.get(k) for k in ("ready_s", "first_token_s", "ttft_first_ms", "ttft_next_ms", "error")}
            log(f"{name}: {brief}")
        order = order[-1:] + order[:-1]
    return finish(out, args.label, status)


# --- what a newcomer sees: ./scripts/serve.sh -----------------------------------------------------------


def service_memory(server: Server) -> dict[str, float]:
    """Resident memory (MiB) of each service: its worker process and everything under it."""
    memory: dict[str, float] = {}
    for name, workers in server.workers().items():
        tree = [p for worker in workers for p in (worker, *worker.children(recursive=True))]
        memory[name] = round(sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
    return memory


def first_token_ms(url: str, runs: int = 5) -> dict[str, float]:
    body = {"prompt": SHORT_PROMPT, "temperature": 0, "max_tokens": 32}
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


def serve_sh(out: Path) -> int:
    """./scripts/serve.sh to ready, each service's memory, the first token through both tiers: serve-sh.json."""
    port = free_port()
    server = Server("serve.sh", [str(ROOT / "scripts" / "serve.sh"), "--host", "127.0.0.1"], {"PORT": str(port)}, port,
                    out / "logs" / "serve-sh.log")
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
    write_json(out / "meta.json", {"question": "startup", "serve_sh": True, "machine": describe_machine()})
    write_json(out / "serve-sh.json", result)
    print(json.dumps(result, indent=2), flush=True)
    return finish(out, "", 0)
