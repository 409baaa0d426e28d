"""Routing across GPU replicas: the pipeline's KV-aware fronts against vllm-router, on the same
replicas' engines, workloads and GPU. Each system (a front door over N replicas) runs each workload
in turn, `--rounds` times, the order alternating; every run starts from empty prefix caches, and
the hit rate and spread are read from each engine's own /metrics. bench/README.md says more.

    python -m bench routing --cpu --replicas 2 --systems pipeline-kv pipeline-rr --workloads prefix:4
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import cli
from bench.chat_load import run_chat_load
from bench.datasets import ChatWorkload, Workload, conversations, ideal_hit_rate
from bench.loadgen import run_load
from bench.machine import describe_machine
from bench.metrics import errors, summarize
from bench.results import finish, log, results_folder
from bench.server_metrics import (ENGINE_COUNTERS, engine_block_size, engine_counters, router_counters,
                                  routing_reasons)
from harness import EngineSettings, Server, free_port, make_server, pipeline_command, start_tier, tier_command, tier_env
from services.gpu.caches import cache_environment

SYSTEMS = ("pipeline-kv", "pipeline-rr", "pipeline-ll", "pipeline-kv-2fronts",
           "router-cache_aware", "router-round_robin", "router-kv_aware")
ROUTING = {"kv": "kv", "rr": "round-robin", "ll": "least-loaded"}
KV_EVENTS_PORT = 5600  # + 10 x replica: the kv_aware router's ZMQ subscription to each vLLM replica
PREDICTION_TTL_S = 3.5  # above services/front/routing/index.py's PREDICTION_TTL_S: no run inherits a prediction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_engine(parser, ready_timeout=900, cpu_kvcache_gib=1)
    cli.add_output(parser)
    cli.add_rounds(parser, "every system on every workload this many times, the order alternating; round k's "
                   "prompts use seed + k, the same for every system")
    group = parser.add_argument_group("replicas and systems")
    group.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS[:2] + SYSTEMS[4:6]))
    group.add_argument("--replicas", type=int, default=2)
    group.add_argument("--block-size", type=int, help="the engines' KV block size (default: their own, from "
                       "/model_info or /metrics)")
    group.add_argument("--engine-clients", type=int, default=2, help="each LLMService replica's PIPELINE_ENGINE_CLIENTS")
    group.add_argument("--api-servers", type=int, default=2, help="each vllm serve replica's --api-server-count")
    group.add_argument("--side-by-side", action="store_true", help="both kinds' replicas up at once on GPU 0")
    group = parser.add_argument_group("workloads")
    group.add_argument("--workloads", nargs="+", type=parse_run, default=[parse_run("prefix:32")],
                       help="NAME:CONCURRENCY, NAME one of prefix, mixed, multiturn, random")
    group.add_argument("--prompts", type=int, default=384, help="prefix, mixed and random: requests per run")
    group.add_argument("--prefix-len", type=int, default=2048)
    group.add_argument("--suffix-len", type=int, default=128)
    group.add_argument("--num-prefixes", type=int, default=16)
    group.add_argument("--prefix-output-len", type=int, default=64, help="prefix and mixed: tokens out")
    group.add_argument("--mixed-prefixes", type=int, default=64, help="mixed: how many prefixes")
    group.add_argument("--mixed-min-len", type=int, default=256, help="mixed: the shortest prefix, in tokens")
    group.add_argument("--mixed-max-len", type=int, default=8192, help="mixed: the longest prefix (log-uniform between)")
    group.add_argument("--zipf", type=float, default=1.1, help="mixed: the k-th prefix is picked with weight 1/k**zipf")
    group.add_argument("--conversations", type=int, default=64, help="multiturn: conversations per run")
    group.add_argument("--turns", type=int, default=4)
    group.add_argument("--first-len", type=int, default=1024, help="multiturn: tokens of a conversation's first message")
    group.add_argument("--turn-len", type=int, default=128, help="multiturn: tokens of each later message")
    group.add_argument("--turn-output-len", type=int, default=128)
    group.add_argument("--warmup-conversations", type=int, default=8, help="one-turn conversations each system "
                       "gets before its first run (0: none)")
    group.add_argument("--input-len", type=int, default=512, help="random: prompt tokens")
    group.add_argument("--output-len", type=int, default=256, help="random: output tokens")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.side_by_side and not args.cpu and not args.kv_cache_memory_bytes:
        parser.error("replicas sharing a GPU need --kv-cache-memory-bytes")
    if any(s.startswith("router") for s in args.systems) and importlib.util.find_spec("vllm_router") is None:
        parser.error("the router-* systems need vllm-router: pip install vllm-router==0.1.17")


# --- the workloads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    workload: str  # prefix, multiturn or random
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.workload}-c{self.concurrency}"


def parse_run(text: str) -> Run:
    name, _, concurrency = text.partition(":")
    if name not in ("prefix", "mixed", "multiturn", "random") or not concurrency.isdigit() or int(concurrency) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give prefix:C, mixed:C, multiturn:C or random:C")
    return Run(name, int(concurrency))


def chat_workload(args: argparse.Namespace, run: Run, seed: int) -> ChatWorkload:
    if run.workload == "prefix":
        return ChatWorkload("prefix", run.concurrency, args.prompts, args.prefix_output_len, seed, args.prefix_len,
                            args.suffix_len, args.num_prefixes)
    if run.workload == "mixed":
        return ChatWorkload("mixed", run.concurrency, args.prompts, args.prefix_output_len, seed, args.mixed_max_len,
                            args.suffix_len, args.mixed_prefixes, min_prefix_len=args.mixed_min_len, zipf=args.zipf)
    return ChatWorkload("multiturn", run.concurrency, args.conversations, args.turn_output_len, seed,
                        turns=args.turns, first_len=args.first_len, turn_len=args.turn_len)


# --- the servers ---------------------------------------------------------------------------------------


def pipeline_env(settings: EngineSettings, args: argparse.Namespace) -> dict[str, str | None]:
    """A tier's environment on the benchmark's engine settings; the model's own chat template
    (as `vllm serve` uses), not the test tiers' hermes one."""
    env: dict[str, str | None] = dict(pipeline_command(settings, 0, args.prompt_workers, args.engine_clients)[1])
    env |= {"PIPELINE_CHAT_TEMPLATE": None, "PIPELINE_ENABLE_AUTO_TOOL_CHOICE": None, "PIPELINE_TOOL_CALL_PARSER": None,
            "PIPELINE_REQUEST_TIMEOUT_S": "3600"}
    return env


def on_gpu(server: Server, index: int, args: argparse.Namespace, caches: Path) -> None:
    """Compile caches of its own among the servers up at once; on one shared GPU when --side-by-side.
    One kind after the other, replica i of the second kind reuses what replica i of the first
    compiled (the same engine settings: the same cache entries), so only the first kind starts cold."""
    if not args.cpu:
        server.env |= cache_environment(caches / (server.name if args.side_by_side else f"replica{index}"))
        if args.side_by_side:
            server.env["CUDA_VISIBLE_DEVICES"] = "0"


class ReplicaGroup:
    """N replicas of one kind on the same engine settings: started together, waited for in turn."""

    kind: str
    args: argparse.Namespace
    replicas: list[Server]

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()

    def wait_ready(self) -> None:
        for replica in self.replicas:
            log(f"{replica.name} ready after {replica.wait_ready(self.args.ready_timeout):.0f} s")


class PipelineGroup(ReplicaGroup):
    """N LLMService replicas and the PromptService fronts the chosen systems need."""

    kind = "pipeline"

    def __init__(self, settings: EngineSettings, args: argparse.Namespace, logs: Path, caches: Path) -> None:
        self.args, self.logs = args, logs
        self.env = pipeline_env(settings, args)
        self.replicas = []
        for index in range(args.replicas):
            name, port = f"pipeline-replica{index}", free_port()
            replica = Server(name, tier_command("LLMService", port), tier_env(**self.env), port, logs / f"{name}.log")
            on_gpu(replica, index, args, caches)
            self.replicas.append(replica)
        self.fronts: dict[str, Server] = {}
        self.block: int | None = None  # the engines' KV block size, once they are up

    def wait_ready(self) -> None:
        super().wait_ready()
        urls = ",".join(replica.url for replica in self.replicas)
        for system in self.args.systems:
            if not system.startswith("pipeline"):
                continue
            policy = ROUTING[system.split("-")[1]]
            for name in [f"front-{policy}", *([f"front-{policy}-b"] if system.endswith("2fronts") else [])]:
                if name not in self.fronts:
                    env = {**self.env, "PIPELINE_GPU_TIER_REPLICAS": urls, "PIPELINE_ROUTING": policy}
                    self.fronts[name] = start_tier("PromptService", log=self.logs / f"{name}.log", env=env,
                                                   depends={"LLMService": self.replicas[0].url}, wait=False)
        for name, front in self.fronts.items():
            log(f"{name} ready after {front.wait_ready(self.args.ready_timeout):.0f} s")

    def front_doors(self, system: str, run_name: str) -> list[str]:
        policy = ROUTING[system.split("-")[1]]
        names = [f"front-{policy}", *([f"front-{policy}-b"] if system.endswith("2fronts") else [])]
        return [self.fronts[name].url for name in names]

    def reset(self) -> None:
        for replica in self.replicas:
            with llm_tier(replica) as llm:
                reset_cache(lambda: llm.post("/reset_prefix_cache", json={}), replica.name)

    def block_size(self) -> int | None:
        with llm_tier(self.replicas[0]) as llm:
            return llm.post("/model_info", json={}).raise_for_status().json().get("kv_block_size")

    def servers(self) -> list[Server]:
        return [*self.replicas, *self.fronts.values()]

    def stop(self) -> None:
        for server in self.servers():
            server.stop()


def llm_tier(replica: Server) -> httpx.Client:
    """A client of one LLMService replica, with the internal token."""
    return httpx.Client(base_url=replica.url, headers=replica.internal_headers, timeout=30)


class VllmGroup(ReplicaGroup):
    """N `vllm serve` replicas, and a vllm-router started for each run."""

    kind = "vllm"

    def __init__(self, settings: EngineSettings, args: argparse.Namespace, logs: Path, caches: Path) -> None:
        self.args, self.logs, self.settings = args, logs, settings
        self.kv_events = "router-kv_aware" in args.systems
        self.replicas = []
        for index in range(args.replicas):
            extra = ["--kv-events-config", json.dumps(kv_events_config(index))] if self.kv_events else []
            replica = make_server(f"vllm-api{args.api_servers}", settings, free_port(), logs, vllm_args=extra)
            replica.name = f"vllm-replica{index}"
            replica.log = logs / f"{replica.name}.log"
            replica.env["VLLM_SERVER_DEV_MODE"] = "1"  # POST /reset_prefix_cache
            on_gpu(replica, index, args, caches)
            self.replicas.append(replica)
        self.router: Server | None = None
        self.block: int | None = None  # the engines' KV block size, once they are up

    def front_doors(self, system: str, run_name: str) -> list[str]:
        """A new router with the system's policy (the previous one stopped), its log the run's."""
        self.stop_router()
        policy = system.removeprefix("router-")
        port = free_port()
        argv = [sys.executable, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                "--prometheus-port", str(free_port()),  # its default port is one for all: a leftover router holds it
                "--worker-urls", *(replica.url for replica in self.replicas), "--policy", policy]
        if policy == "kv_aware":
            for index, replica in enumerate(self.replicas):
                argv += ["--kv-event-source", f"{replica.url}=tcp://127.0.0.1:{KV_EVENTS_PORT + 10 * index}"]
            argv += ["--kv-event-block-size", str(self.block), "--kv-event-model", self.settings.served_name]
        self.router = Server(system, argv, {}, port, self.logs / f"{run_name}.log", ready_path="/health", live_path=None)
        self.router.start_and_wait(120)
        return [self.router.url]

    def reset(self) -> None:
        for replica in self.replicas:
            reset_cache(lambda: httpx.post(f"{replica.url}/reset_prefix_cache", timeout=30), replica.name)

    def block_size(self) -> int | None:
        return engine_block_size(f"{self.replicas[0].url}/metrics")

    def stop_router(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None

    def servers(self) -> list[Server]:
        return [*self.replicas, *([self.router] if self.router else [])]

    def stop(self) -> None:
        self.stop_router()
        for replica in self.replicas:
            replica.stop()


def kv_events_config(index: int) -> dict:
    """vLLM's KV-cache events on a ZMQ port of this replica's own, for the kv_aware router."""
    port = KV_EVENTS_PORT + 10 * index
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}",
            "replay_endpoint": f"tcp://*:{port + 1}"}


def reset_cache(post, name: str, within_s: float = 60) -> None:
    """Empty one replica's prefix cache; the engine refuses while requests hold blocks: ask again."""
    deadline = time.monotonic() + within_s
    while True:
        answer = post()
        if answer.status_code == 200 and (not answer.content or answer.json().get("success", True)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not empty its prefix cache: HTTP {answer.status_code} {answer.text[:200]}")
        time.sleep(0.5)


# --- one run -------------------------------------------------------------------------------------------


def counters(replicas: list[Server]) -> dict[str, dict[str, float]]:
    return {replica.name: engine_counters(f"{replica.url}/metrics") for replica in replicas}


def moved(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {counter: after[name][counter] - before[name][counter] for counter in ENGINE_COUNTERS} for name in after}


def measure(args, group, system: str, run: Run, seed: int, out: Path, name: str, warm_up: bool) -> dict:
    group.reset()
    doors = group.front_doors(system, name)
    if warm_up and args.warmup_conversations:  # the first requests a server sees pay for its kernels' warm-up
        warm = ChatWorkload("multiturn", 4, args.warmup_conversations, 8, seed=10_000 + seed, turns=1, first_len=64)
        asyncio.run(run_chat_load(doors, args.served_name, warm, conversations(warm, args.tokenizer)))
        group.reset()
    if system.startswith("pipeline"):
        time.sleep(PREDICTION_TTL_S)  # the fronts' predictions from the warm-up expire; their indexes saw the reset
    before = counters(group.replicas)
    fronts = [f"{door}/metrics" for door in doors] if system.startswith("pipeline") else []
    believed_before, reasons_before = router_counters(fronts), routing_reasons(fronts)
    if run.workload == "random":
        workload = Workload(args.input_len, args.output_len, run.concurrency, args.prompts, seed)
        record = run_load(doors[0], args.served_name, args.model, workload, out / "logs" / system,
                          [pid for server in group.servers() for pid in server.pids()])
        record["workload"] |= {"kind": "random"}
    else:
        workload = chat_workload(args, run, seed)
        record = asyncio.run(run_chat_load(doors, args.served_name, workload, conversations(workload, args.tokenizer)))
    record["replicas"] = moved(before, counters(group.replicas))
    if fronts:  # the router's belief beside the engines' word: where they differ, the routing was wrong
        believed = router_counters(fronts)
        record["router"] = {replica: {name: value - believed_before.get(replica, {}).get(name, 0.0)
                                      for name, value in values.items()} for replica, values in believed.items()}
        record["routing_reasons"] = {reason: count - reasons_before.get(reason, 0.0)
                                     for reason, count in routing_reasons(fronts).items()}
    record["system"], record["run"], record["block_size"] = system, run.label, group.block
    if run.workload != "random":
        record["ideal_hit_rate"] = ideal_hit_rate(record, group.block)
    return record


def describe(record: dict) -> str:
    figures = summarize(record)
    replicas = record["replicas"]
    queried = sum(r["vllm:prefix_cache_queries_total"] for r in replicas.values())
    hits = sum(r["vllm:prefix_cache_hits_total"] for r in replicas.values())
    spread = "/".join(f"{r['vllm:request_success_total']:.0f}" for r in replicas.values())
    ideal = f" (ideal {record['ideal_hit_rate']:.1%})" if "ideal_hit_rate" in record else ""
    if record.get("router"):
        blocks = sum(r["pipeline_replica_prompt_blocks_total"] for r in record["router"].values())
        expected = sum(r["pipeline_replica_cached_blocks_predicted_total"] for r in record["router"].values())
        ideal += f", router expected {expected / blocks if blocks else float('nan'):.1%} of blocks cached"
    if record.get("routing_reasons"):
        ideal += ", kv decisions " + " ".join(f"{reason} {count:.0f}" for reason, count in record["routing_reasons"].items())
    return (f"{figures['completed']} ok, {figures['failed']} failed, {figures['output_throughput']:.1f} out tok/s, "
            f"TTFT p50/p90 {figures['ttft_p50_ms']:.0f}/{figures['ttft_p90_ms']:.0f} ms, "
            f"hit rate {hits / queried if queried else float('nan'):.1%}{ideal}, requests per replica {spread}, "
            f"errors {errors(record)}")


# --- the whole benchmark -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from vllm.tokenizers import get_tokenizer

    out = results_folder(args.out, "routing")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    settings = cli.engine_settings(args)
    args.model, args.served_name = settings.model, settings.served_name
    args.tokenizer = get_tokenizer(args.model)
    meta = {"question": "routing", "machine": describe_machine(), "engine": settings.__dict__, "label": args.label,
            "args": {k: v for k, v in vars(args).items() if k not in ("module", "command_parser", "tokenizer")}, "ready_s": {}}
    caches = Path(args.caches or Path(os.environ.get("TMPDIR", "/tmp")) / "routing-bench-caches")
    kinds = [kind for kind in ("pipeline", "vllm") if any(s.startswith(kind if kind == "pipeline" else "router")
                                                          for s in args.systems)]
    groups = [(PipelineGroup if kind == "pipeline" else VllmGroup)(settings, args, out / "logs", caches) for kind in kinds]
    batches = [groups] if args.side_by_side else [[group] for group in groups]
    status = 0
    try:
        for batch in batches:
            for group in batch:
                log(f"starting the {group.kind} replicas")
                group.start()
            for group in batch:
                group.wait_ready()
            for group in batch:  # the engines' own (the same settings: the same size), unless given
                group.block = args.block_size or group.block_size()
                log(f"{group.kind} replicas: KV blocks of {group.block} tokens")
            systems = [s for s in args.systems if any(group_of(s) == g.kind for g in batch)]
            warmed: set[str] = set()
            for round_index in range(1, args.rounds + 1):
                order = systems if round_index % 2 else systems[::-1]  # who goes first alternates
                for run_ in args.workloads:
                    for system in order:
                        if system.endswith("2fronts") and run_.workload == "random":
                            continue  # no prefix to share: nothing a second front could show
                        group = next(g for g in batch if g.kind == group_of(system))
                        name = f"{run_.label}-{system}-r{round_index}"
                        try:
                            record = measure(args, group, system, run_, args.seed + round_index, out, name,
                                             warm_up=system not in warmed)
                            warmed.add(system)
                            (out / "runs" / f"{name}.json").write_text(json.dumps(record))
                            log(f"{name}: {describe(record)}")
                        except Exception:
                            traceback.print_exc()
                            meta.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
                            status = 1
                        finally:
                            if isinstance(group, VllmGroup):
                                group.stop_router()
                        (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            for group in batch:
                meta["ready_s"] |= {s.name: s.ready_after_s for s in group.servers()}
                group.stop()
    finally:
        for group in groups:
            group.stop()
        (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return finish(out, args.label, status)


def group_of(system: str) -> str:
    return "pipeline" if system.startswith("pipeline") else "vllm"
