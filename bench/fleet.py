"""What kv routing costs one front worker as the fleet grows, without a GPU: the routing decision's
time, the memory of what the worker knows of every replica, and the streams a replica serves.

    python -m bench fleet --replicas 64 128 --blocks 30000

Stand-in replicas in one process (the real Replica, FleetIndex and KvAware policy, no network), each
holding `--blocks` KV blocks of Zipf-popular documents; decisions on 2k, 8k and 32k-token prompts
that start with a document, each after an engine event.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import tracemalloc
from pathlib import Path

from bench.machine import describe_machine
from bench.results import log, results_folder, write_json
from services.front.routing.index import FleetIndex
from services.front.routing.policy import KvAware, Prompt
from services.front.routing.replica import Replica
from services.kv_blocks import block_keys
from services.protocol import CacheEvents, ModelInfo, ReplicaLoad

BLOCK = 16
VOCAB = 49152


def documents(count: int, rng: random.Random) -> list[list[int]]:
    """Token ids of `count` documents, 256 to 8,192 tokens long (log-uniform)."""
    return [[rng.randrange(VOCAB) for _ in range(int(256 * 32 ** rng.random()))] for _ in range(count)]


def stand_in(port: int, blocks: int, fleet: FleetIndex) -> Replica:
    replica = Replica(f"http://10.{port // 250}.{port % 250}.1:3000", token="t" * 16, timeout_s=5,
                      check_interval_s=1, retry_after_s=1, on_change=lambda *_: None, fleet=fleet)
    replica.monitor.ready = True
    replica.use(ModelInfo(model="m", max_model_len=65536, vocab_size=VOCAB, kv_block_size=BLOCK,
                          kv_cache_blocks=blocks, kv_events=True))
    replica.index.apply(CacheEvents(cleared=True))
    replica.report(ReplicaLoad(running=8))
    return replica


def fill(replicas: list[Replica], keys: list[list[int]], weights: list[float], blocks: int, rng: random.Random) -> None:
    """Each replica's snapshot: whole documents, drawn by popularity, until its cache is full, its
    keys decoded from JSON as a stream's are (an int object of their own per replica)."""
    for replica in replicas:
        held: list[int] = []
        while len(held) < blocks:
            held.extend(rng.choices(keys, weights)[0])
        replica.index.apply(CacheEvents.model_validate_json(CacheEvents(cleared=True, stored=held[:blocks]).model_dump_json()))


def churn(replica: Replica, rng: random.Random, blocks: int = 16) -> None:
    """One event frame: the engine evicts `blocks` blocks and stores as many new ones."""
    held = replica.index.held
    removed = [held.pop() for _ in range(min(blocks, len(held)))]
    held.update(removed)  # popped only to pick them; the frame removes them
    replica.index.apply(CacheEvents(removed=removed, stored=[rng.getrandbits(63) for _ in range(blocks)]))


def measure(count: int, blocks: int, docs: list[list[int]], keys: list[list[int]], decisions: int, seed: int) -> dict:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(docs))]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    fleet = FleetIndex()  # one worker's, as its ReplicaSet has
    replicas = [stand_in(port, blocks, fleet) for port in range(count)]
    fill(replicas, keys, weights, blocks, rng)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    memory = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    policy = KvAware()
    timings: dict[str, list[float]] = {}
    for length in (2048, 8192, 32768):
        spent = []
        for _ in range(decisions):
            doc = docs[rng.choices(range(len(docs)), weights)[0]]
            tokens = (doc * (length // len(doc) + 1))[:length - 64] + [rng.randrange(VOCAB) for _ in range(64)]
            churn(replicas[rng.randrange(count)], rng)
            started = time.perf_counter()
            policy.choose(replicas, Prompt(tokens), time.monotonic())
            spent.append((time.perf_counter() - started) * 1000)
        spent.sort()
        timings[f"{length // 1024}k"] = {"p50_ms": round(statistics.median(spent), 3),
                                         "p99_ms": round(spent[int(len(spent) * 0.99) - 1], 3)}
    return {"replicas": count, "blocks_per_replica": blocks, "index_memory_mb": round(memory / 2**20, 1),
            "bytes_per_held_block": round(memory / (count * blocks), 1), "decision": timings}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", nargs="+", type=int, default=[64, 128], help="fleet sizes, measured in turn")
    parser.add_argument("--blocks", type=int, default=30000, help="KV blocks each replica holds")
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--decisions", type=int, default=300, help="per prompt length")
    parser.add_argument("--workers", type=int, default=8, help="front workers per host (streams and memory per host)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="the results folder (default bench/results/<date>-fleet/)")


def run(args: argparse.Namespace) -> int:
    out = results_folder(args.out, "fleet")
    rng = random.Random(args.seed)
    docs = documents(args.documents, rng)
    keys = [block_keys(doc, BLOCK) for doc in docs]
    results = []
    for count in args.replicas:
        row = measure(count, args.blocks, docs, keys, args.decisions, args.seed)
        row["streams_per_replica"] = args.workers  # one per front worker, on each front host
        row["index_memory_per_host_mb"] = round(row["index_memory_mb"] * args.workers, 1)
        log(str(row))
        results.append(row)
    write_json(out / "summary.json", {
        "question": "what kv routing costs one front worker as the fleet grows (stand-in replicas)",
        "machine": describe_machine(), "workers_per_host": args.workers, "block_size": BLOCK,
        "documents": args.documents, "decisions_per_length": args.decisions, "results": results})
    log(f"results: {out}")
    return 0
