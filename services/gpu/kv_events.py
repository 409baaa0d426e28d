"""The engine's prefix cache as block keys, for the front tier's routing (LLMService's /kv_events).

vLLM publishes its KV cache events on `ipc://` ZMQ sockets in the run directory (`kv_events_config`).
Each worker subscribes (`KvEventSubscriber`) and keeps the whole cache as the project's own block
keys (`KvIndex`); a missed batch is asked of the replay socket, or the index starts over empty.
`KvEventHub` serves it to the /kv_events streams: a snapshot, then each batch's change
(docs/architecture.md, "KV events").
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

from services.kv_blocks import block_keys
from services.protocol import CacheEvents

logger = logging.getLogger("bentoml.service.llm")

TOPIC = b"kv"
EVENTS_SOCKET = "kv-events"
REPLAY_SOCKET = "kv-replay"
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)  # vLLM's ZmqEventPublisher.END_SEQ
# The storage tiers an engine's own prefix cache lives in (offloaded copies are not hits).
OWN_MEDIA = (None, "GPU")


def kv_events_config(run_dir: Path):
    """vLLM's KVEventsConfig: ZMQ publisher and replay sockets inside the run directory."""
    from vllm.config import KVEventsConfig

    return KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        endpoint=f"ipc://{run_dir}/{EVENTS_SOCKET}",
        replay_endpoint=f"ipc://{run_dir}/{REPLAY_SOCKET}",
        topic=TOPIC.decode(),
    )


class KvIndex:
    """The engine's cached blocks as block keys: vLLM block hash -> (our key, how many blocks of
    the engine have that hash), and key -> how many vLLM hashes give it."""

    def __init__(self, adapter_name: Callable[[int], str | None] = lambda lora_id: None) -> None:
        self._adapter_name = adapter_name
        self._blocks: dict[Hashable, list[int]] = {}  # vLLM hash -> [key, copies]
        self._held: dict[int, int] = {}  # key -> vLLM hashes that give it

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self) -> list[int]:
        return list(self._held)

    def snapshot(self) -> CacheEvents:
        return CacheEvents(cleared=True, stored=self.keys())

    def clear(self) -> CacheEvents:
        self._blocks.clear()
        self._held.clear()
        return CacheEvents(cleared=True)

    def apply(self, events: Iterable) -> CacheEvents | None:
        """One batch of vLLM's events; the change it made to the keys held (None: no change)."""
        cleared = False
        before: dict[int, bool] = {}  # each key touched: was it held before this batch
        for event in events:
            kind = type(event).__name__
            if kind == "AllBlocksCleared":
                self.clear()
                cleared, before = True, {}
            elif kind == "BlockStored" and self._own(event):
                for key in self._store(event):
                    before.setdefault(key, self._held.get(key, 0) > 1)
            elif kind == "BlockRemoved" and self._own(event):
                for key in self._remove(event.block_hashes):
                    before.setdefault(key, True)
        if cleared:
            return CacheEvents(cleared=True, stored=self.keys())
        stored = [key for key, was in before.items() if not was and key in self._held]
        removed = [key for key, was in before.items() if was and key not in self._held]
        return CacheEvents(stored=stored, removed=removed) if stored or removed else None

    @staticmethod
    def _own(event) -> bool:
        return getattr(event, "medium", None) in OWN_MEDIA and getattr(event, "group_idx", None) in (None, 0)

    def _store(self, event) -> list[int]:
        """The keys that gained a block (each one once the hash is new)."""
        if event.parent_block_hash is None:
            parent = None
        elif event.parent_block_hash in self._blocks:
            parent = self._blocks[event.parent_block_hash][0]
        else:
            return []  # its chain is unknown here (after a gap): left out
        adapter = getattr(event, "lora_name", None)
        if adapter is None and getattr(event, "lora_id", None) is not None:
            adapter = self._adapter_name(event.lora_id)
            if adapter is None:
                return []  # an adapter this replica no longer knows by name
        keys = block_keys(event.token_ids, event.block_size, adapter, parent=parent)
        touched = []
        for block_hash, key in zip(event.block_hashes, keys):
            entry = self._blocks.get(block_hash)
            if entry is not None:
                entry[1] += 1
                continue
            self._blocks[block_hash] = [key, 1]
            self._held[key] = self._held.get(key, 0) + 1
            touched.append(key)
        return touched

    def _remove(self, block_hashes) -> list[int]:
        """The keys that lost a vLLM hash (each one once the hash's last block goes)."""
        touched = []
        for block_hash in block_hashes:
            entry = self._blocks.get(block_hash)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] > 0:
                continue
            del self._blocks[block_hash]
            key = entry[0]
            self._held[key] -= 1
            if self._held[key] == 0:
                del self._held[key]
            touched.append(key)
        return touched


class KvEventSequence:
    """Batch numbers: which batches are new, and where one is missing."""

    def __init__(self) -> None:
        self.expected = 0  # the publisher numbers its batches from 0

    def check(self, seq: int) -> str:
        """`old` (seen already), `next`, or `gap` (batches before it are missing)."""
        if seq < self.expected:
            return "old"
        return "next" if seq == self.expected else "gap"

    def seen(self, seq: int) -> None:
        self.expected = seq + 1


class KvEventHub:
    """The index and the /kv_events streams reading it, on one event loop."""

    MAX_PENDING = 1024  # frames a stream may fall behind by before it gets a fresh snapshot

    def __init__(self, index: KvIndex) -> None:
        self.index = index
        self._streams: set[KvStream] = set()

    def publish(self, frame: CacheEvents | None) -> None:
        if frame is None:
            return
        for stream in self._streams:
            stream.push(frame)

    def apply(self, events: Iterable) -> None:
        self.publish(self.index.apply(events))

    def clear(self) -> None:
        self.publish(self.index.clear())

    def open(self) -> KvStream:
        stream = KvStream(self.index.snapshot(), self.MAX_PENDING)
        self._streams.add(stream)
        return stream

    def close(self, stream: KvStream) -> None:
        self._streams.discard(stream)

    @property
    def streams(self) -> int:
        return len(self._streams)


class KvStream:
    """One /kv_events caller's frames still to send."""

    def __init__(self, snapshot: CacheEvents, max_pending: int) -> None:
        self.pending: deque[CacheEvents] = deque([snapshot])
        self.max_pending = max_pending
        self.behind = False  # fell too far behind: send a snapshot next
        self.ready = asyncio.Event()
        self.ready.set()

    def push(self, frame: CacheEvents) -> None:
        if len(self.pending) >= self.max_pending:
            self.pending.clear()
            self.behind = True
        else:
            self.pending.append(frame)
        self.ready.set()

    def take(self, index: KvIndex) -> list[CacheEvents]:
        if self.behind:
            self.behind = False
            self.pending.clear()
            frames = [index.snapshot()]
        else:
            frames = list(self.pending)
            self.pending.clear()
        self.ready.clear()
        return frames


class KvEventSubscriber:
    """A thread that reads the engine's event batches and hands them, in order and without a gap,
    to the hub on the event loop."""

    def __init__(self, run_dir: Path, hub: KvEventHub, loop: asyncio.AbstractEventLoop) -> None:
        import zmq
        from vllm.distributed.kv_events import KVEventBatch
        import msgspec

        self._decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode
        self._hub, self._loop = hub, loop
        self._context = zmq.Context()
        self._events = self._context.socket(zmq.SUB)
        self._events.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self._events.connect(f"ipc://{run_dir}/{EVENTS_SOCKET}")
        self._replay_address = f"ipc://{run_dir}/{REPLAY_SOCKET}"
        self.sequence = KvEventSequence()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="KvEvents")
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        try:
            # what the engine published before this subscription was up (ZMQ's slow joiner: a SUB
            # socket misses what is sent before its subscription reaches the publisher)
            self._catch_up(until=None)
            while not self._stopped.is_set():
                if not self._events.poll(100):
                    continue
                _, seq, payload = self._events.recv_multipart()
                self._receive(int.from_bytes(seq, "big"), payload)
        except Exception:  # the engine is gone, or a bad frame: the index can no longer be trusted
            logger.exception("KV events: the subscription failed; serving an empty cache from here on")
            self._loop.call_soon_threadsafe(self._hub.clear)
        finally:
            self._events.close(linger=0)
            self._context.term()

    def _receive(self, seq: int, payload: bytes) -> None:
        status = self.sequence.check(seq)
        if status == "old":
            return
        if status == "gap":
            self._catch_up(until=seq)
            if self.sequence.check(seq) == "old":
                return
        self._deliver(seq, payload)

    def _deliver(self, seq: int, payload: bytes) -> None:
        self._loop.call_soon_threadsafe(self._hub.apply, self._decode(payload).events)
        self.sequence.seen(seq)

    def _start_over(self, seq: int) -> None:
        """Batches before `seq` are lost: the index starts over empty, then takes `seq` on. What it
        then holds is a part of the engine's cache (a block on an unknown parent is left out)."""
        logger.warning("KV events: batches %d..%d are missing and no longer replayable; starting over empty",
                       self.sequence.expected, seq - 1)
        self._loop.call_soon_threadsafe(self._hub.clear)
        self.sequence.expected = seq

    def _catch_up(self, until: int | None, timeout_ms: int = 2000) -> None:
        """The batches from the next one expected, from the replay socket: those before `until`
        (a batch that came with a gap before it), or all it holds (None)."""
        for seq, payload in self._replayed(self.sequence.expected, timeout_ms):
            if until is not None and seq >= until:
                break
            status = self.sequence.check(seq)
            if status == "old":
                continue
            if status == "gap":
                self._start_over(seq)
            self._deliver(seq, payload)
        if until is not None and self.sequence.check(until) == "gap":
            self._start_over(until)

    def _replayed(self, start: int, timeout_ms: int) -> list[tuple[int, bytes]]:
        """What vLLM's replay socket (a ROUTER) holds from batch `start` on, in order."""
        import zmq

        batches = []
        with self._context.socket(zmq.DEALER) as replay:
            replay.setsockopt(zmq.LINGER, 0)
            replay.connect(self._replay_address)
            replay.send_multipart((b"", start.to_bytes(8, "big")))
            while replay.poll(timeout_ms):
                _, _, seq_bytes, payload = replay.recv_multipart()
                if seq_bytes == END_OF_REPLAY:
                    break
                batches.append((int.from_bytes(seq_bytes, "big"), payload))
        return batches
