"""LLMService's /kv_events: each worker relays the replica's one KV indexer to the streams it serves.

The indexer (services/gpu/kv_indexer.py) publishes every change of the replica's index already
encoded and numbered; `KvEventRelay` opens each stream on a snapshot the indexer encodes, passes the
changes after it on byte for byte, tells the indexer the pending keys of this worker's requests,
and sends the engine's load at least every LOAD_ANYWAY_S. An indexer silent for DEADLINE_S makes
every frame say `degraded`, until it is back and the stream has a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from services.gpu.kv_indexer import (
    CHANGES_SOCKET,
    HIGH_WATER_MARK,
    PENDING_SOCKET,
    SNAPSHOT_SOCKET,
    address,
    encode_keys,
    unpack,
)
from services.protocol import CacheEvents, ReplicaLoad, encode_frame

logger = logging.getLogger("bentoml.service.llm")

LOAD_EVERY_S = 0.25  # how often the load is read, and sent when it changed
LOAD_ANYWAY_S = 1.0  # the longest a stream goes without a frame (the front's deadline is ~3 s)
DEADLINE_S = 2.0  # an indexer not heard for this long (4 heartbeats) is gone
SNAPSHOT_TIMEOUT_S = 1.0
MAX_QUEUED = 1024  # chunks a stream may fall behind by before it gets a fresh snapshot instead
RECENT = 4096  # changes kept to bring a snapshot up to date


class KvStream:
    """One /kv_events caller's chunks still to send; `seq` is the last change it has (None: it
    waits for a snapshot, and its frames say degraded meanwhile)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ready = asyncio.Event()
        self.seq: int | None = None
        self.started = False  # a first frame (a snapshot) was queued
        self.said_degraded: bool | None = None  # in its last load frame

    def push(self, chunk: bytes) -> bool:
        """Queue a chunk; False (and the queue dropped) when the caller has fallen too far behind."""
        if len(self.chunks) >= MAX_QUEUED:
            self.chunks.clear()
            self.seq = None
            return False
        self.chunks.append(chunk)
        self.started = True
        self.ready.set()
        return True

    async def take(self, timeout_s: float) -> bytes:
        """What is queued, once there is something or `timeout_s` has passed (then b"")."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except TimeoutError:
            return b""
        self.ready.clear()
        chunk = b"".join(self.chunks)
        self.chunks.clear()
        return chunk


class KvEventRelay:
    """This worker's view of the indexer: its messages (from a thread that reads its PUB socket),
    its snapshots (asked of its ROUTER socket) and its liveness, relayed to this worker's streams."""

    def __init__(self, run_dir: Path, epoch: str | None, load: Callable[[], ReplicaLoad], worker: int = 0) -> None:
        import zmq

        self.run_dir, self.epoch, self.load, self.worker = run_dir, epoch, load, worker
        self.context = zmq.Context()
        self.streams: set[KvStream] = set()
        # the indexer as last heard: which one, its last change, whether its index is degraded
        self.instance: bytes | None = None
        self.seq: int | None = None
        self.indexer_degraded = False
        self.heard_at = float("-inf")
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=RECENT)  # contiguous changes up to `seq`
        self._fetching = False
        self._sent_load: ReplicaLoad | None = None
        self._sent_at = float("-inf")
        self._pending = self.context.socket(zmq.PUSH)
        self._pending.setsockopt(zmq.IMMEDIATE, 1)  # no indexer: a message is dropped, never queued
        self._pending.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self._pending.setsockopt(zmq.LINGER, 0)
        self._pending.connect(address(run_dir, PENDING_SOCKET))
        self._stopped = threading.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> KvEventRelay:
        """On the worker's event loop."""
        self.loop = asyncio.get_running_loop()
        self._follower = threading.Thread(target=self._follow, daemon=True, name="KvEventRelay")
        self._follower.start()
        self._tasks.append(self.loop.create_task(self._tick_forever()))
        return self

    def stop(self) -> None:
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        self._follower.join(timeout=2)
        self._pending.close(linger=0)

    @property
    def live(self) -> bool:
        return time.monotonic() - self.heard_at < DEADLINE_S

    # --- streams -----------------------------------------------------------------------------------

    def open(self) -> KvStream:
        stream = KvStream()
        self.streams.add(stream)
        if not self.live and self.heard_at > float("-inf"):  # gone (not merely not heard from yet)
            self._start_without_indexer(stream)
        self._resync()  # a snapshot: at once, or when the indexer is back
        return stream

    def close(self, stream: KvStream) -> None:
        self.streams.discard(stream)

    def _start_without_indexer(self, stream: KvStream) -> None:
        """A stream's first frame while the indexer is gone: nothing known, degraded (a snapshot
        follows when the indexer is back)."""
        stream.push(encode_frame(CacheEvents(cleared=True, epoch=self.epoch, degraded=True)).encode())
        self._push_load(stream)

    # --- the requests' pending keys (non-blocking; lost when the indexer is gone) --------------------

    def pending(self, request_id: str, keys: list[int]) -> bool:
        return self._send_pending([b"+", self._request(request_id), encode_keys(keys)])

    def done(self, request_id: str) -> bool:
        return self._send_pending([b"-", self._request(request_id)])

    def _request(self, request_id: str) -> bytes:
        return f"{self.worker}/{request_id}".encode()

    def _send_pending(self, message: list[bytes]) -> bool:
        import zmq

        try:
            self._pending.send_multipart(message, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    # --- the indexer's changes and heartbeats ------------------------------------------------------

    def _follow(self) -> None:
        """The thread that reads the indexer's PUB socket and hands its messages to the loop."""
        import zmq

        socket = self.context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address(self.run_dir, CHANGES_SOCKET))
        try:
            while not self._stopped.is_set():
                if not socket.poll(100):
                    continue
                messages = []
                while len(messages) < 1024:
                    try:
                        messages.append(unpack(socket.recv_multipart(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
                    except ValueError:  # not a message of the indexer's: skipped
                        logger.exception("KV events: a malformed message from the indexer")
                try:
                    self.loop.call_soon_threadsafe(self.heard, messages)
                except RuntimeError:  # the loop is closed: the worker is stopping
                    return
        finally:
            socket.close(linger=0)

    def heard(self, messages: list[tuple[bytes, int, bool, bytes]]) -> None:
        """The indexer's messages, in order (on the loop)."""
        for instance, seq, degraded, frame in messages:
            self.heard_at = time.monotonic()
            if instance != self.instance:
                self._new_indexer(instance)
            if frame:
                self._change(seq, frame)
            else:
                self._heartbeat(seq)
            self.seq, self.indexer_degraded = seq, degraded
        self._resync()

    def _new_indexer(self, instance: bytes) -> None:
        """Another indexer (restarted): its numbers start over, so every stream needs a snapshot of it."""
        self.instance, self.seq = instance, None
        self.recent.clear()
        for stream in self.streams:
            stream.seq = None

    def _heartbeat(self, seq: int) -> None:
        """The indexer's last change is `seq`: a stream that has not had it missed it."""
        if self.seq is not None and seq != self.seq:
            self.recent.clear()
        for stream in self.streams:
            if stream.seq is not None and stream.seq < seq:
                stream.seq = None

    def _change(self, seq: int, frame: bytes) -> None:
        if self.seq is not None and seq != self.seq + 1:
            self.recent.clear()  # a change was lost on the way here
        self.recent.append((seq, frame))
        for stream in self.streams:
            if stream.seq is None or stream.seq >= seq:
                continue
            if stream.seq == seq - 1 and stream.push(frame):
                stream.seq = seq
            else:
                stream.seq = None

    # --- snapshots ----------------------------------------------------------------------------------

    def _resync(self) -> None:
        """Ask the indexer for a snapshot if a stream waits for one (one request at a time)."""
        if not self._fetching and any(stream.seq is None for stream in self.streams):
            self._fetching = True
            self._tasks = [task for task in self._tasks if not task.done()]
            self._tasks.append(self.loop.create_task(self._fetch()))

    async def _fetch(self) -> None:
        try:
            reply = await asyncio.to_thread(fetch_snapshot, self.context, address(self.run_dir, SNAPSHOT_SOCKET),
                                            SNAPSHOT_TIMEOUT_S)
        except Exception:  # a malformed answer: as no answer
            logger.exception("KV events: the indexer's snapshot could not be read")
            reply = None
        finally:
            self._fetching = False
        if reply is None:  # no answer: streams that have sent nothing yet start without it
            for stream in self.streams:
                if not stream.started:
                    self._start_without_indexer(stream)
            return  # the next tick asks again, if the indexer is heard from by then
        instance, seq, degraded, snapshot = reply
        self.heard_at = time.monotonic()
        if instance != self.instance:
            self._new_indexer(instance)
        if self.seq is None or seq >= self.seq:
            self.indexer_degraded = degraded
            catching_up: list[bytes] = []
        else:  # the changes since the snapshot, if this worker has them all
            catching_up = [frame for number, frame in self.recent if number > seq]
            if not self.recent or self.recent[0][0] > seq + 1:
                self._resync()
                return
        for stream in self.streams:
            if stream.seq is not None:
                continue
            first = not stream.started
            if all(stream.push(chunk) for chunk in [snapshot, *catching_up]):
                stream.seq = max(seq, self.seq if self.seq is not None else seq)
                if first:
                    self._push_load(stream)
        self._resync()

    # --- the load, and frames that say degraded -----------------------------------------------------

    def _degraded(self, stream: KvStream) -> bool:
        return stream.seq is None or not self.live or self.indexer_degraded

    def _push_load(self, stream: KvStream) -> None:
        """A new stream's load, right after its first frame."""
        stream.said_degraded = self._degraded(stream)
        stream.push(self._load_frame(self.load(), stream.said_degraded))

    def _load_frame(self, load: ReplicaLoad, degraded: bool) -> bytes:
        return encode_frame(CacheEvents(degraded=degraded, load=load)).encode()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(LOAD_EVERY_S)
            try:
                self.tick()
            except Exception:  # never the end of the load frames
                logger.exception("KV events: a load frame failed")

    def tick(self) -> None:
        """Send the load when it changed or LOAD_ANYWAY_S passed, and to a stream whose degraded
        state changed; ask for the snapshots that are due."""
        if self.live:
            self._resync()
        load, now = self.load(), time.monotonic()
        due = load != self._sent_load or now - self._sent_at >= LOAD_ANYWAY_S
        frames: dict[bool, bytes] = {}  # encoded once for every stream that says the same
        for stream in self.streams:
            degraded = self._degraded(stream)
            if stream.started and (due or degraded != stream.said_degraded):
                if degraded not in frames:
                    frames[degraded] = self._load_frame(load, degraded)
                stream.push(frames[degraded])
                stream.said_degraded = degraded
        if due:
            self._sent_load, self._sent_at = load, now


def fetch_snapshot(context, snapshot_address: str, timeout_s: float) -> tuple[bytes, int, bool, bytes] | None:
    """The indexer's snapshot (instance, seq, degraded, encoded frame), or None without an answer."""
    import zmq

    with context.socket(zmq.DEALER) as dealer:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(snapshot_address)
        dealer.send(b"snapshot")
        if not dealer.poll(int(timeout_s * 1000)):
            return None
        return unpack(dealer.recv_multipart())
