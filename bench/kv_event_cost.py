"""CPU time per stored block on a replica's event plane: its KV indexer, and a worker's relay
(`python -m bench costs --parts kv-events`).

    python -m bench costs --parts kv-events [--kv-block-size 16] [--kv-blocks 100000] [--kv-streams 8]
    python -m bench costs --parts kv-events --kv-before CHECKOUT   # the worker path before issue 28

A stand-in engine (a ZMQ PUB socket sending vLLM's msgpack batches: one prompt's chained blocks
each, evictions past `--capacity`) feeds a real KV indexer process and a worker's relay process
with `--streams` streams drained; each one's CPU time (user + system, minus the same time idle)
is divided by the blocks stored. `--before` runs instead the worker of a checkout of cfa69fe: its
own subscription and index, and one encoding per stream (every worker of a replica did all that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import psutil
import zmq

from services.kv_blocks import block_keys

ROOT = Path(__file__).resolve().parent.parent
# vLLM's publisher's sockets, as services/gpu/kv_indexer.py names them (and cfa69fe's kv_events.py)
TOPIC, EVENTS_SOCKET, REPLAY_SOCKET = b"kv", "kv-events", "kv-replay"
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


def workload(blocks: int, block_size: int, per_batch: int, capacity: int, seed: int = 0) -> tuple[list[bytes], list[int]]:
    """vLLM's batches as msgpack (an EventBatch: [ts, events]), and the last batch's token ids (its
    last block's key is the marker, in whichever definition of the keys the measured code has)."""
    rng = random.Random(seed)
    batches, held, made, tokens = [], [], 0, []
    while made < blocks:
        tokens = [rng.randrange(1, 30000) for _ in range(per_batch * block_size)]
        hashes = [made + i + 1 for i in range(per_batch)]
        events = [{"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None, "token_ids": tokens,
                   "block_size": block_size, "lora_id": None, "medium": "GPU", "lora_name": None}]
        held.extend(hashes)
        if len(held) > capacity:
            evicted, held = held[:len(held) - capacity], held[len(held) - capacity:]
            events.append({"type": "BlockRemoved", "block_hashes": evicted, "medium": "GPU"})
        batches.append(msgspec.msgpack.encode([time.time(), events]))
        made += per_batch
    return batches, tokens


class StandInEngine:
    """vLLM's publisher as the indexer sees it: PUB [topic, seq, payload], and its replay socket
    (every batch from the one asked for, then END)."""

    def __init__(self, run_dir: Path) -> None:
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)  # never drop: the measure needs every batch
        self.pub.bind(f"ipc://{run_dir}/{EVENTS_SOCKET}")
        self.replay = self.context.socket(zmq.ROUTER)
        self.replay.bind(f"ipc://{run_dir}/{REPLAY_SOCKET}")
        self.seq = 0
        self.published: list[bytes] = []
        threading.Thread(target=self._answer_replays, daemon=True).start()

    def _answer_replays(self) -> None:
        while True:
            client, _, start = self.replay.recv_multipart()
            for seq in range(int.from_bytes(start, "big"), len(self.published)):
                self.replay.send_multipart([client, b"", TOPIC, seq.to_bytes(8, "big"), self.published[seq]])
            self.replay.send_multipart([client, b"", b"", END_OF_REPLAY, b""])  # as vLLM ends a replay

    def publish(self, payload: bytes) -> None:
        self.published.append(payload)
        self.pub.send_multipart([TOPIC, self.seq.to_bytes(8, "big"), payload])
        self.seq += 1


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def wait_for(check, within_s: float, every_s: float = 0.05) -> bool:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


def measure(args) -> dict:
    from services.gpu.kv_events import fetch_snapshot
    from services.gpu.kv_indexer import SNAPSHOT_SOCKET, address

    run_dir = Path(tempfile.mkdtemp(prefix="kvc-"))
    batches, last_tokens = workload(args.blocks, args.block_size, args.per_batch, args.capacity)
    marker = block_keys(last_tokens, args.block_size)[-1]
    (run_dir / "last-tokens.json").write_text(json.dumps([last_tokens, args.block_size]))
    warm, _ = workload(args.per_batch, args.block_size, args.per_batch, args.capacity, seed=1)
    engine = StandInEngine(run_dir)
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    indexer = None
    if args.before is None:
        indexer = subprocess.Popen([sys.executable, "-m", "services.gpu.kv_indexer", "--run-dir", str(run_dir),
                                    "--epoch", "bench", "--capacity", str(args.capacity)], env=environment)
    # this file loaded by path, with `services` from the checkout measured (and nothing of bench/ on sys.path)
    load_this = (f"import importlib.util as u; s = u.spec_from_file_location('cost', {__file__!r}); "
                 f"m = u.module_from_spec(s); s.loader.exec_module(m); "
                 f"m.run_worker({str(run_dir)!r}, {args.streams}, {args.before!r})")
    worker = subprocess.Popen([sys.executable, "-c", load_this], cwd=run_dir,
                              env={**environment, "PYTHONPATH": args.before or str(ROOT)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert said(worker, "ready", 60), "the worker did not start"
        for payload in warm:  # every process up and subscribed (ZMQ's slow joiner), then idle
            engine.publish(payload)
        time.sleep(3)
        processes = {"worker": psutil.Process(worker.pid)}
        if indexer is not None:
            processes["indexer"] = psutil.Process(indexer.pid)
        idle_s = 5.0
        before = {name: cpu(process) for name, process in processes.items()}
        time.sleep(idle_s)
        idle = {name: cpu(process) - before[name] for name, process in processes.items()}
        start, started = {name: cpu(process) for name, process in processes.items()}, time.monotonic()
        for i, payload in enumerate(batches):
            engine.publish(payload)
            if i % 64 == 63:
                time.sleep(0.001)
        done = {}
        if indexer is not None:
            snapshot = address(run_dir, SNAPSHOT_SOCKET)
            context = zmq.Context.instance()
            assert wait_for(lambda: (reply := fetch_snapshot(context, snapshot, 5)) and str(marker).encode() in reply[3],
                            600), "the indexer never had the last block"
            done["indexer"] = cpu(processes["indexer"])
        assert said(worker, "marker", 600), "the worker never relayed the last block"
        done["worker"] = cpu(processes["worker"])
        wall = time.monotonic() - started
        result = {"blocks": args.blocks, "block_size": args.block_size, "blocks_per_batch": args.per_batch,
                  "capacity": args.capacity, "streams": args.streams, "wall_s": round(wall, 1),
                  "mode": "before (cfa69fe worker)" if args.before else "indexer + relay"}
        for name in processes:
            busy = done[name] - start[name] - idle[name] * (wall / idle_s)
            result[f"{name}_cpu_s"] = round(done[name] - start[name], 3)
            result[f"{name}_us_per_block"] = round(1e6 * busy / args.blocks, 2)
        return result
    finally:
        worker.stdin.close()
        for process in (worker, indexer):
            if process is not None:
                process.terminate()
                process.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)


def said(process: subprocess.Popen, line: str, within_s: float) -> bool:
    """Whether the process printed `line` next, within the deadline."""
    ready, _, _ = select.select([process.stdout], [], [], within_s)
    return bool(ready) and process.stdout.readline().strip() == line


def run_worker(run_dir: str, streams: int, before: str | None) -> None:
    """A worker's event plane with `streams` streams drained, until stdin closes; says `marker`
    once a stream has carried the last block's key (by the measured checkout's own block keys)."""
    from services.kv_blocks import block_keys
    from services.protocol import ReplicaLoad

    last_tokens, block_size = json.loads((Path(run_dir) / "last-tokens.json").read_text())
    marker = block_keys(last_tokens, block_size)[-1]

    async def main() -> None:
        marker_text = str(marker).encode()
        if before is None:
            from services.gpu.kv_events import KvEventRelay

            relay = KvEventRelay(Path(run_dir), "bench", ReplicaLoad).start()
            opened = [relay.open() for _ in range(streams)]

            async def drain(stream) -> bytes:
                return await stream.take(0.25)
        else:  # the worker of cfa69fe (PYTHONPATH): its own subscription and index, each stream's frames encoded
            from services.gpu.kv_events import KvEventHub, KvEventSubscriber, KvIndex
            from services.protocol import encode_frame

            hub = KvEventHub(KvIndex())
            KvEventSubscriber(Path(run_dir), hub, asyncio.get_running_loop())
            opened = [hub.open() for _ in range(streams)]

            async def drain(stream) -> bytes:
                try:
                    await asyncio.wait_for(stream.ready.wait(), 0.25)
                except TimeoutError:
                    return b""
                return "".join(encode_frame(frame) for frame in stream.take(hub.index)).encode()

        said = asyncio.Event()

        async def follow(stream) -> None:
            while True:
                if marker_text in await drain(stream) and not said.is_set():
                    said.set()
                    print("marker", flush=True)

        tasks = [asyncio.create_task(follow(stream)) for stream in opened]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent is done
        for task in tasks:
            task.cancel()

    asyncio.run(main())
