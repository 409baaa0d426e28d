"""The pipeline against vLLM's own OpenAI server: same model, same engine settings, same client.

Each target is started (in turn, or side by side with --devices) and driven through the concurrency
sweep by `vllm bench serve` (bench/loadgen.py); one record per target and level in runs/, and the
comparison in summary.json / summary.md at the end (bench/report/serve.py).

    python -m bench serve --cpu --targets pipeline vllm --concurrency 1 4 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import traceback
from pathlib import Path

from bench import cli, profile
from bench.datasets import Workload
from bench.loadgen import run_load
from bench.machine import describe_machine
from bench.metrics import errors, summarize
from bench.results import finish, log, results_folder
from bench.server_metrics import level_means_ms, metrics_urls, scrape
from harness import free_port, gpu_host_processes, make_server, parse_cpus, pin
from services.gpu.caches import cache_environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_engine(parser)
    cli.add_output(parser)
    cli.add_targets(parser, ["vllm", "pipeline"])
    cli.add_rounds(parser, "measure every level this many times, the servers taking turns (needs --devices: "
                   "all up side by side); files <target>-c<N>-r<k>.json")
    cli.add_load(parser)
    group = parser.add_argument_group("placement")
    group.add_argument(
        "--devices", nargs="+", metavar="CUDA_VISIBLE_DEVICES",
        help="one GPU list per target (e.g. 0 1, or 0 0 0 to share one GPU: then give --kv-cache-memory-bytes): "
        "start the servers together, then measure one at a time",
    )  # fmt: skip
    group.add_argument("--pin-gpu-host", metavar="CPUS", help="after start, pin what runs on the GPU machine (all of "
                       "vLLM's server; the pipeline's LLMService and engine) to these CPUs, e.g. 0-1")
    group.add_argument("--pin-rest", metavar="CPUS", help="pin this command, the load generators and the rest of the "
                       "servers (the pipeline's PromptService) to these CPUs, e.g. 2-15")
    group.add_argument("--py-spy", action="store_true", help="profile what runs on the GPU machine during every level "
                       "(py-spy, not pausing the processes): profiles/<target>-c<N>/ (bench/profile.py)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.devices and len(args.devices) != len(args.targets):
        parser.error("--devices needs one entry per target")
    if args.rounds > 1 and not args.devices:
        parser.error("--rounds needs --devices: the servers are up side by side and take turns")
    shared = args.devices and len(set(args.devices)) < len(args.devices)
    if shared and not args.cpu and not args.kv_cache_memory_bytes:
        parser.error("servers sharing a GPU need --kv-cache-memory-bytes (and a --gpu-memory-utilization that leaves "
                     "room for the others): vLLM's start-up memory profile counts what the others allocate meanwhile")


def get_ready(args: argparse.Namespace, target: str, server, meta: dict) -> None:
    """Wait for `target` to be ready, pin what would run on the GPU machine (--pin-gpu-host), and
    record its start in `meta`."""
    ready = server.wait_ready(args.ready_timeout)
    log(f"{target} ready after {ready:.0f} s")
    if args.pin_gpu_host:  # what would run on the GPU machine, onto its CPU budget
        threads = pin(gpu_host_processes(server), parse_cpus(args.pin_gpu_host))
        log(f"{target}: {threads} threads pinned to CPUs {args.pin_gpu_host}")
    env = {k: v for k, v in server.env.items() if k != "PIPELINE_INTERNAL_TOKEN"}  # a secret, even a throwaway one
    meta["servers"][target] = {"ready_after_s": ready, "argv": server.argv, "env": env}


def clients_for(concurrency: int, per_client: int) -> int:
    return max(1, math.ceil(concurrency / per_client))


def run(args: argparse.Namespace) -> int:
    out = results_folder(args.out, "serve")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    settings = cli.engine_settings(args)
    meta = {
        "question": "serve",
        "machine": describe_machine(),
        "engine": settings.__dict__,
        "prompt_workers": args.prompt_workers,
        "workload": {"input_len": args.input_len, "output_len": args.output_len, "seed": args.seed},
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "label": args.label,
        "servers": {},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if args.pin_rest:  # the servers and load generators started from here inherit it
        os.sched_setaffinity(0, parse_cpus(args.pin_rest))
        meta["pinned"] = {"gpu_host": args.pin_gpu_host, "rest": args.pin_rest}
    servers = {}
    for i, target in enumerate(args.targets):
        servers[target] = make_server(target, settings, free_port(), out / "logs", args.prompt_workers)
        if args.devices:  # all started at once (start-up is slow), each on its own GPU(s) or sharing them
            servers[target].env["CUDA_VISIBLE_DEVICES"] = args.devices[i]
            # each compiles into its own cache: two servers of the same engine settings compiling into one
            # folder at the same moment would race on its files
            servers[target].env["VLLM_CACHE_ROOT"] = str(Path(tempfile.gettempdir()) / f"vllm-cache-{target}")
        if args.caches:  # every compile cache of each server in a folder of its own (services/gpu/caches.py)
            servers[target].env |= cache_environment(Path(args.caches) / target)
    status = 0
    failed: set[str] = set()

    def fail(target: str) -> None:
        nonlocal status
        traceback.print_exc()
        meta["servers"].setdefault(target, {})["error"] = traceback.format_exc()[-2000:]
        failed.add(target)
        status = 1

    order = list(servers)
    try:
        if args.devices:
            for target, server in servers.items():
                log(f"starting {target}: {' '.join(server.argv)} (CUDA_VISIBLE_DEVICES={server.env['CUDA_VISIBLE_DEVICES']})")
                server.start()
            # every server up before the first is measured: no level runs beside another server's compilation
            for target, server in servers.items():
                try:
                    get_ready(args, target, server, meta)
                except Exception:
                    fail(target)
        # With --rounds R (servers up side by side), every level is measured R times, the servers taking
        # turns and the one that went first in a round going last in the next.
        for round_index in range(1, args.rounds + 1):
            for target in order:
                if target in failed:
                    continue
                server = servers[target]
                try:
                    if round_index == 1 and not args.devices:
                        log(f"starting {target}: {' '.join(server.argv)}")
                        server.start()
                        get_ready(args, target, server, meta)
                    suffix = f"-r{round_index}" if args.rounds > 1 else ""
                    sweep(args, target, server, settings, out, suffix=suffix, warm_up=round_index == 1)
                except Exception:
                    fail(target)
                finally:
                    if args.rounds == 1 or target in failed:
                        server.stop()
                        log(f"stopped {target}")
                (out / "meta.json").write_text(json.dumps(meta, indent=1))
            order = order[1:] + order[:1]
    finally:
        for server in servers.values():
            server.stop()
    return finish(out, args.label, status)


def sweep(args: argparse.Namespace, target: str, server, settings, out: Path, suffix: str = "",
          warm_up: bool = True) -> None:
    """A warm-up at the highest concurrency, then every load level; one record per level (its file
    named `<target>-c<N><suffix>.json`)."""
    if warm_up and args.warmup_concurrency > 0:
        warm = min(max(args.concurrency), args.warmup_concurrency)
        warmup = Workload(args.input_len, args.output_len, warm, warm, args.seed + 1000, clients_for(warm, args.per_client))
        run_load(server.url, settings.served_name, settings.model, warmup, out / "logs" / f"{target}-warmup", server.pids())
    for concurrency in args.concurrency:
        prompts = max(args.min_prompts, concurrency * args.prompts_per_concurrency)
        workload = Workload(
            args.input_len, args.output_len, concurrency, prompts, args.seed, clients_for(concurrency, args.per_client)
        )
        urls = metrics_urls(server)
        before = scrape(urls)
        profiling = contextlib.nullcontext()
        if args.py_spy:
            profiling = profile.record(gpu_host_processes(server), out / "profiles" / f"{target}-c{concurrency}{suffix}")
        with profiling:
            record = run_load(server.url, settings.served_name, settings.model, workload, out / "logs" / target, server.pids())
        record["target"] = target
        record["server_metrics"] = level_means_ms(before, scrape(urls))
        (out / "runs" / f"{target}-c{concurrency}{suffix}.json").write_text(json.dumps(record))
        f = summarize(record)
        loadgen = [v["mean"] for k, v in record["cpu"].items() if k.startswith("loadgen:")]
        log(
            f"{target}{suffix} c={concurrency}: {f['completed']} ok, {f['failed']} failed, "
            f"{f['output_throughput']:.1f} out tok/s, TTFT p50 {f['ttft_p50_ms']:.1f} ms, "
            f"ITL p50 {f['itl_p50_ms']:.2f} ms, TPOT p50 {f['tpot_p50_ms']:.2f} ms, "
            f"{f['tokens_per_chunk']:.2f} tokens/chunk, load generator CPU {loadgen} %, errors {errors(record)}, "
            f"server metrics {record['server_metrics']}"
        )
