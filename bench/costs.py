"""The pipeline's own costs, each measured alone: what the split adds around the engine.

Parts (`--parts`): `cpu-tier` (templates, tokenization, detokenization and frames per core,
in-process); `round-trips` and `llm-tier` (one served pipeline: the bare hop, the full path, and
LLMService's CPU time per output token); `front` (PromptService alone against a stand-in GPU tier
at GPU token rates: its CPU time per token); `chunks` (BentoML's CPU time per streamed chunk);
`kv-events` (a replica's KV event plane per stored block: its indexer, a worker's relay);
`workers` (how evenly PromptService's workers share a kept-alive client's requests, with
PIPELINE_SPREAD_CONNECTIONS off and on).

    python -m bench costs --parts cpu-tier round-trips --cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from bench import cli
from bench.datasets import LONG_TEXT, SHORT_PROMPT, Workload
from bench.loadgen import run_load
from bench.machine import describe_machine
from bench.metrics import summarize
from bench.results import finish, log, results_folder, write_json
from harness import EngineSettings, Server, free_port, make_server, start_tier

PARTS = ("cpu-tier", "round-trips", "llm-tier", "front", "chunks", "kv-events", "workers")
HERE = Path(__file__).resolve().parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_engine(parser, max_model_len=2048, dtype="auto", prompt_workers=1, cpu_kvcache_gib=1)
    cli.add_output(parser)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["cpu-tier", "round-trips"])
    group = parser.add_argument_group("cpu-tier and round-trips")
    group.add_argument("--seconds", type=float, default=2.0, help="cpu-tier: CPU seconds per figure")
    group.add_argument("-n", type=int, default=50, help="round-trips: calls per kind")
    group = parser.add_argument_group("llm-tier and front (vllm bench serve, random prompts)")
    group.add_argument("--concurrency", type=int, default=16)
    group.add_argument("--input-len", type=int, help="default: 64 (llm-tier), 512 (front)")
    group.add_argument("--output-len", type=int, help="default: 64 (llm-tier), 256 (front)")
    group.add_argument("--prompts", type=int, help="default: 48 (llm-tier), 4 x concurrency (front)")
    group.add_argument("--idle-s", type=float, default=20, help="llm-tier: seconds LLMService's idle CPU use is "
                       "measured for, and subtracted")
    group.add_argument("--bentoml-config", help="llm-tier: the served pipeline's BENTOML_CONFIG file (e.g. one that "
                       "excludes /generate from tracing)")
    group.add_argument("--interval-ms", type=float, default=2.0, help="front and workers: the stand-in GPU tier's time "
                       "between tokens")
    group.add_argument("--profile", help="front: a py-spy profile (raw format) of the PromptService worker, here")
    group = parser.add_argument_group("workers (--prompt-workers workers, --concurrency kept-alive connections)")
    group.add_argument("--requests-per-connection", type=int, default=8)
    group = parser.add_argument_group("chunks (bench/chunk_stream_service.py)")
    group.add_argument("--variants", nargs="+", default=["0", "1"], choices=["0", "1", "2", "3"],
                       help="0 BentoML's defaults; 1 tracing, metrics and access log off; 2 only the route excluded "
                       "from tracing; 3 only metrics and access log off")
    group.add_argument("--lines", type=int, default=3000, help="lines per stream")
    group.add_argument("--streams", type=int, default=16)
    group = parser.add_argument_group("kv-events (bench/kv_event_cost.py: a stand-in engine, no server)")
    group.add_argument("--kv-blocks", type=int, default=100_000, help="blocks the stand-in engine stores")
    group.add_argument("--kv-block-size", type=int, default=16)
    group.add_argument("--kv-per-batch", type=int, default=128, help="blocks a batch stores (one prompt's)")
    group.add_argument("--kv-capacity", type=int, default=30_000, help="the engine's cache in blocks (evictions past it)")
    group.add_argument("--kv-streams", type=int, default=8, help="/kv_events streams the worker serves")
    group.add_argument("--kv-before", help="a checkout of the project before one index per replica: its worker instead")


def run(args: argparse.Namespace) -> int:
    out = results_folder(args.out, "costs")
    settings = cli.engine_settings(args)
    machine = describe_machine()
    write_json(out / "meta.json", {"question": "costs", "machine": machine, "engine": settings.__dict__,
                                   "parts": args.parts, "label": args.label})
    result: dict = {"machine": machine, "model": settings.model}
    if "cpu-tier" in args.parts:
        result["cpu_tier_per_core"] = cpu_tier_costs(settings.model, args.seconds)
        log(f"cpu tier per core: {json.dumps(result['cpu_tier_per_core'])}")
    if {"round-trips", "llm-tier"} & set(args.parts):
        result |= served_pipeline_costs(settings, args, out)
    if "front" in args.parts:
        result["front"] = front_cost(settings, args, out)
        log(f"front: {result['front']}")
    if "workers" in args.parts:
        result["workers"] = worker_spread(settings, args, out)
        log(f"workers: {result['workers']}")
    if "chunks" in args.parts:
        result["chunks"] = {variant: chunk_cost(variant, args.lines, args.streams, out) for variant in args.variants}
        log(f"chunks: {result['chunks']}")
    if "kv-events" in args.parts:
        from bench import kv_event_cost

        result["kv_events"] = kv_event_cost.measure(argparse.Namespace(
            blocks=args.kv_blocks, block_size=args.kv_block_size, per_batch=args.kv_per_batch,
            capacity=args.kv_capacity, streams=args.kv_streams, before=args.kv_before))
        log(f"kv events: {result['kv_events']}")
    write_json(out / "summary.json", result)
    return finish(out, args.label, 0)


# --- cpu-tier and round-trips ---------------------------------------------------------------------------


def per_second(fn, *, seconds: float = 2.0) -> float:
    """Calls of fn per second of this process's CPU time, after one warm-up call.

    CPU time, not wall time: on a shared machine other processes take turns on the cores, and
    what is asked is the throughput of one core. Everything measured here runs on one thread.
    """
    fn()
    n, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def cpu_tier_costs(model_path: str, seconds: float = 2.0) -> dict:
    from services.front.text.detokenizer import IncrementalDetokenizer
    from services.front.text.templates import ChatFormatter, load_chat_template
    from services.front.text.tokenizer import encode, load_tokenizer
    from services.protocol import DeltaDecoder, GenerateDelta, encode_frame

    tokenizer = load_tokenizer(model_path)
    formatter = ChatFormatter(tokenizer, load_chat_template("model", tokenizer.chat_template))
    prompts = {"short": SHORT_PROMPT, "long": LONG_TEXT * 6}
    out: dict = {"template_tokenize": {}, "detokenize": {}, "frames": {}}
    for name, text in prompts.items():
        messages = [{"role": "user", "content": text}]
        ids = encode(tokenizer, formatter.render(messages), add_special_tokens=False)
        rate = per_second(lambda: encode(tokenizer, formatter.render(messages), add_special_tokens=False), seconds=seconds)
        template_only = per_second(lambda: formatter.render(messages), seconds=seconds)
        out["template_tokenize"][name] = {
            "prompt_tokens": len(ids),
            "requests_per_s": round(rate, 1),
            "template_only_requests_per_s": round(template_only, 1),
            "ms_per_request": round(1000 / rate, 3),
        }

    ids = tokenizer.encode(LONG_TEXT * 8, add_special_tokens=False)  # real text: realistic merges
    backend = tokenizer.backend_tokenizer
    for label, step, stop in (
        ("1_per_push", 1, ()),
        ("8_per_push", 8, ()),
        ("1_per_push_with_stop_string", 1, ("</answer>",)),
    ):
        def decode_all() -> None:
            d = IncrementalDetokenizer(backend, stop=stop)
            for i in range(0, len(ids), step):
                d.push(ids[i : i + step])
            d.finish()

        rate = per_second(decode_all, seconds=seconds)
        out["detokenize"][label] = {"tokens_per_s": round(rate * len(ids)), "sequence_tokens": len(ids)}

    frame = encode_frame(GenerateDelta(token_ids=[1234], prompt_tokens=512, completion_tokens=17))
    frames = frame * 64
    out["frames"] = {
        "frame_bytes": len(frame),
        "encode_per_s": round(per_second(lambda: encode_frame(GenerateDelta(token_ids=[1234], prompt_tokens=512, completion_tokens=17)), seconds=seconds)),
        "decode_per_s": round(per_second(lambda: DeltaDecoder().feed(frames), seconds=seconds) * 64),
    }
    return out


def _stats(samples_s: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def round_trips(server, token_ids: list[int], n: int) -> dict:
    import httpx

    body = {"request": {"request_id": "x", "token_ids": token_ids, "sampling_params": {"max_tokens": 1, "ignore_eos": True}}}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client, httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=server.llm_socket()), base_url="http://llm",
        headers=server.internal_headers, timeout=30,
    ) as llm:

        async def timed(call) -> list[float]:
            samples = []
            for i in range(n + 5):
                start = time.perf_counter()
                await call(i)
                if i >= 5:  # warm-up calls are not counted
                    samples.append(time.perf_counter() - start)
            return samples

        async def model_info(i: int) -> None:
            (await llm.post("/model_info", json={})).raise_for_status()

        async def llm_generate(i: int) -> None:
            body["request"]["request_id"] = f"rt-{i}-{time.time_ns()}"
            async with llm.stream("POST", "/generate", json=body) as r:
                r.raise_for_status()
                await r.aread()

        async def front_generate(i: int) -> None:
            payload = {"tokens": token_ids, "max_tokens": 1, "ignore_eos": True}
            async with client.stream("POST", "/generate", json=payload) as r:
                r.raise_for_status()
                await r.aread()

        async def front_chat(i: int) -> None:
            payload = {"prompt": SHORT_PROMPT, "max_tokens": 1, "ignore_eos": True}
            async with client.stream("POST", "/generate", json=payload) as r:
                r.raise_for_status()
                await r.aread()

        return {
            "llm_model_info_direct": _stats(await timed(model_info)),
            "llm_generate_1_token_direct": _stats(await timed(llm_generate)),
            "pipeline_generate_1_token_token_ids": _stats(await timed(front_generate)),
            "pipeline_generate_1_token_chat_prompt": _stats(await timed(front_chat)),
        }


def served_pipeline_costs(settings: EngineSettings, args: argparse.Namespace, out: Path) -> dict:
    """The two tiers under `bentoml serve`, started once for round-trips and llm-tier."""
    from services.front.text.tokenizer import encode, load_tokenizer

    server = make_server("pipeline", settings, free_port(), out / "logs", prompt_workers=args.prompt_workers)
    if args.bentoml_config:
        server.env["BENTOML_CONFIG"] = str(Path(args.bentoml_config).resolve())
    server.start_and_wait(args.ready_timeout)
    found: dict = {}
    try:
        if "round-trips" in args.parts:
            token_ids = encode(load_tokenizer(settings.model), SHORT_PROMPT, add_special_tokens=False)
            found["round_trips"] = rt = asyncio.run(round_trips(server, token_ids, args.n))
            rt["cpu_tier_adds_to_first_token_ms"] = round(
                rt["pipeline_generate_1_token_token_ids"]["p50_ms"] - rt["llm_generate_1_token_direct"]["p50_ms"], 3)
            log(f"round trips: {json.dumps(rt)}")
        if "llm-tier" in args.parts:
            found["llm_tier"] = llm_tier_cost(server, settings, args, out)
            log(f"llm tier: {found['llm_tier']}")
    finally:
        server.stop()  # the whole tree: BentoML's workers run in sessions of their own
    return found


# --- llm-tier, front: CPU time per output token ---------------------------------------------------------


def cpu_s(*processes: psutil.Process) -> float:
    return sum(times.user + times.system for times in (process.cpu_times() for process in processes))


def output_tokens(record: dict) -> int:
    return sum(n for n, error in zip(record["requests"]["output_len"], record["requests"]["error"]) if not error)


def llm_tier_cost(server: Server, settings: EngineSettings, args: argparse.Namespace, out: Path) -> dict:
    """LLMService's workers' CPU time (user + system, so a busy machine distorts it little) per output
    token under load, with and without their idle use (event loop, engine polling) subtracted."""
    llm = server.workers()["LLMService"]
    workload = Workload(args.input_len or 64, args.output_len or 64, args.concurrency, args.prompts or 48)
    idle0, t0 = cpu_s(*llm), time.monotonic()
    time.sleep(args.idle_s)
    idle_rate = (cpu_s(*llm) - idle0) / (time.monotonic() - t0)
    before, start = cpu_s(*llm), time.monotonic()
    record = run_load(server.url, settings.served_name, settings.model, workload, out / "logs" / "llm-tier", server.pids())
    cpu, seconds = cpu_s(*llm) - before, time.monotonic() - start
    tokens, figures = output_tokens(record), summarize(record)
    return {"config": args.bentoml_config, "output_tokens": tokens, "failed": figures["failed"],
            "load_s": round(seconds, 1), "llmservice_cpu_s": round(cpu, 3), "idle_cpu_per_s": round(idle_rate, 4),
            "llmservice_cpu_us_per_token": round(1e6 * cpu / max(tokens, 1), 1),
            "above_idle_us_per_token": round(1e6 * (cpu - idle_rate * seconds) / max(tokens, 1), 1),
            "tokens_per_chunk": round(figures["tokens_per_chunk"], 2)}


def paced_gpu_tier(interval_ms: float, out: Path) -> Server:
    """bench/paced_gpu_tier.py (LLMService's contract, one token per choice every `interval_ms`), not started."""
    port = free_port()
    return Server("paced-gpu-tier", [sys.executable, "-m", "bench.paced_gpu_tier", "--port", str(port),
                                     "--interval-ms", str(interval_ms)], {}, port, out / "logs" / "paced-gpu-tier.log")


def front_before(gpu_tier: Server, settings: EngineSettings, log: Path, env: dict[str, str]) -> Server:
    """PromptService alone, ready, with `gpu_tier` as its LLMService and `env` over the defaults here."""
    return start_tier("PromptService", log=log, depends={"LLMService": gpu_tier.url}, ready_timeout_s=180,
                      env={"PIPELINE_MODEL": settings.model, "PIPELINE_SERVED_MODEL_NAME": "m",
                           "PIPELINE_MAX_MODEL_LEN": "4096", **env})


def front_cost(settings: EngineSettings, args: argparse.Namespace, out: Path) -> dict:
    """PromptService alone, one worker, against bench/paced_gpu_tier.py (LLMService's contract, one
    token per choice every --interval-ms): the worker's CPU time per output token."""
    gpu_tier = paced_gpu_tier(args.interval_ms, out)
    front = None
    try:
        gpu_tier.start_and_wait(60)
        front = front_before(gpu_tier, settings, out / "logs" / "front.log", {"PIPELINE_PROMPT_WORKERS": "1"})
        (worker,) = front.workers()["PromptService"]
        profiler = None
        if args.profile:
            profiler = subprocess.Popen(["py-spy", "record", "-p", str(worker.pid), "-d", "25", "-r", "200", "-f", "raw",
                                         "-o", args.profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = cpu_s(worker)
        workload = Workload(args.input_len or 512, args.output_len or 256, args.concurrency,
                            args.prompts or 4 * args.concurrency)
        record = run_load(front.url, "m", settings.model, workload, out / "logs" / "front-load", front.pids())
        spent = cpu_s(worker) - before
        figures = summarize(record)
        if profiler:
            profiler.wait()
        return {"concurrency": args.concurrency, "interval_ms": args.interval_ms, "ok": figures["completed"],
                "failed": figures["failed"], "output_tok_per_s": round(figures["output_throughput"]),
                "front_cpu_us_per_token": round(1e6 * spent / max(output_tokens(record), 1), 1),
                "tokens_per_chunk": round(figures["tokens_per_chunk"], 2), "ttft_p50_ms": round(figures["ttft_p50_ms"], 1),
                "itl_p50_ms": round(figures["itl_p50_ms"], 2)}
    finally:
        if front is not None:
            front.stop()
        gpu_tier.stop()


# --- workers: how evenly PromptService's workers share a kept-alive client's requests -------------------


async def kept_alive_load(base_url: str, connections: int, per_connection: int, output_len: int) -> int:
    """`connections` clients at once, each sending `per_connection` /generate calls one after the
    other over one aiohttp session that keeps connections alive (as bench/chat_load.py and the
    OpenAI SDK do); returns the calls that succeeded."""
    import aiohttp

    payload = {"prompt": SHORT_PROMPT, "max_tokens": output_len, "ignore_eos": True}
    done = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        for _ in range(per_connection):
            async with session.post(f"{base_url}/generate", json=payload) as response:
                await response.read()
                done += response.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(connections)))
    return done


def worker_spread(settings: EngineSettings, args: argparse.Namespace, out: Path) -> dict:
    """PromptService with --prompt-workers workers against bench/paced_gpu_tier.py, once with
    PIPELINE_SPREAD_CONNECTIONS off and once on: each worker's calls (its access log) and CPU time."""
    gpu_tier = paced_gpu_tier(args.interval_ms, out)
    found = {}
    try:
        gpu_tier.start_and_wait(60)
        for spread in ("false", "true"):
            log_path = out / "logs" / f"front-spread-{spread}.log"
            front = front_before(gpu_tier, settings, log_path, {"PIPELINE_PROMPT_WORKERS": str(args.prompt_workers),
                                                                "PIPELINE_SPREAD_CONNECTIONS": spread})
            try:
                workers = front.workers()["PromptService"]
                before = [cpu_s(worker) for worker in workers]
                ok = asyncio.run(kept_alive_load(front.url, args.concurrency, args.requests_per_connection,
                                                 args.output_len or 64))
                spent = [cpu_s(worker) - start for worker, start in zip(workers, before)]
            finally:
                front.stop()
            calls = [line.split("[entry_service:PromptService:")[1].split("]")[0]
                     for line in log_path.read_text().splitlines() if "path=/generate," in line]
            per_worker = sorted((calls.count(str(n)) for n in range(1, len(workers) + 1)), reverse=True)
            found[f"spread_connections_{spread}"] = {
                "ok": ok, "calls_per_worker": per_worker, "cpu_s_per_worker": sorted((round(c, 2) for c in spent), reverse=True),
                "busiest_worker_share_of_calls": round(per_worker[0] / max(sum(per_worker), 1), 3),
                "busiest_worker_share_of_cpu": round(max(spent) / max(sum(spent), 1e-9), 3)}
    finally:
        gpu_tier.stop()
    return {"workers": args.prompt_workers, "connections": args.concurrency,
            "requests_per_connection": args.requests_per_connection, "output_len": args.output_len or 64,
            "interval_ms": args.interval_ms, **found}


# --- chunks: BentoML's cost per streamed chunk ----------------------------------------------------------


async def drive_chunks(base_url: str, worker: psutil.Process, lines: int, streams: int) -> dict:
    async def one(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/stream", json={"n": lines}) as response:
            response.raise_for_status()
            async for _ in response.aiter_raw():
                pass

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        await one(client)  # warm-up
        before, start = cpu_s(worker), time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(streams)))
        cpu, wall = cpu_s(worker) - before, time.perf_counter() - start
    return {"chunks": lines * streams, "server_cpu_s": round(cpu, 3), "wall_s": round(wall, 2),
            "server_cpu_us_per_chunk": round(1e6 * cpu / (lines * streams), 1)}


def chunk_cost(variant: str, lines: int, streams: int, out: Path) -> dict:
    """bench/chunk_stream_service.py (one worker) under one configuration `variant`: `streams`
    concurrent streams of `lines` 77-byte lines; the worker's CPU time per line sent."""
    port = free_port()
    argv = [sys.executable, "-m", "bentoml", "serve", "chunk_stream_service:ChunkStream",
            "--working-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port)]
    server = Server("chunks", argv, {"CHUNK_VARIANT": variant}, port, out / "logs" / f"chunks-{variant}.log")
    server.start_and_wait(300)
    try:
        (worker,) = server.workers()["ChunkStream"]
        return asyncio.run(drive_chunks(server.url, worker, lines, streams))
    finally:
        server.stop()
