"""What the tests of the replica's event plane share: vLLM's own ZMQ publisher standing in for the
engine, the KV indexer run in a thread, and a /kv_events reader's view of the frames."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from vllm.distributed.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher

from services.gpu import kv_indexer
from services.gpu.kv_indexer import KvIndexer
from services.kv_blocks import block_keys
from services.protocol import CacheEvents, FrameDecoder

BLOCK = 4
PROMPT = list(range(100, 100 + 3 * BLOCK + 2))  # three full blocks and two tokens
KEYS = block_keys(PROMPT, BLOCK)


def stored(hashes, tokens, parent=None) -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                       block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None)


def batch(*events) -> KVEventBatch:
    return KVEventBatch(ts=time.time(), events=list(events))


def short_run_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="kv-"))  # short: a Unix socket path


def publisher(run_dir: Path, buffer_steps: int = 10_000) -> ZmqEventPublisher:
    config = kv_indexer.kv_events_config(run_dir)
    return ZmqEventPublisher(0, endpoint=config.endpoint, replay_endpoint=config.replay_endpoint,
                             buffer_steps=buffer_steps, topic=config.topic)


def wait_for(check, within_s: float = 10, every_s: float = 0.02):
    deadline = time.monotonic() + within_s
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(every_s)
    return result


class IndexerThread:
    """A KvIndexer in a thread of this process (the replica runs it as a process of its own)."""

    def __init__(self, run_dir: Path, epoch: str = "epoch-1", capacity: int | None = None) -> None:
        made = threading.Event()

        def run() -> None:
            self.indexer = KvIndexer(run_dir, epoch, capacity)
            made.set()
            self.indexer.run()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert made.wait(10)

    def stop(self) -> None:
        self.indexer.stopped.set()
        self.thread.join(5)


class View:
    """What a front worker keeps of one /kv_events stream."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(CacheEvents)
        self.keys: set[int] = set()
        self.pending: set[int] = set()
        self.frames: list[CacheEvents] = []
        self.times: list[float] = []
        self.degraded: bool | None = None
        self.epoch: str | None = None

    def feed(self, chunk: bytes) -> None:
        for frame in self.decoder.feed(chunk):
            self.apply(frame)

    def apply(self, frame: CacheEvents) -> None:
        self.frames.append(frame)
        self.times.append(time.monotonic())
        if frame.cleared:
            self.keys.clear()
            self.pending.clear()
            self.epoch = frame.epoch
        self.keys.difference_update(frame.removed)
        self.keys.update(frame.stored)
        self.pending.difference_update(frame.unpending)
        self.pending.update(frame.pending)
        self.degraded = frame.degraded
