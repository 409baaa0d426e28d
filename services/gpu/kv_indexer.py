"""The replica's KV indexer: one process per replica, the only reader of its engine's KV events.

Worker 1 starts it with the engine (`KvIndexerProcess`; it exits when its parent does). It keeps
the replica's one `KvIndex`, takes the workers' pending keys (PULL), publishes each change already
encoded, numbered, with a heartbeat every HEARTBEAT_S (PUB), and answers snapshots (ROUTER), all on
`ipc://` sockets in the run directory (mode 0700). docs/architecture.md, "KV events", says why.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path

from services.gpu.kv_index import KvIndex
from services.protocol import encode_frame

logger = logging.getLogger("bentoml.service.llm")

# the engine's sockets (vLLM's ZmqEventPublisher binds them)
TOPIC = b"kv"
EVENTS_SOCKET = "kv-events"
REPLAY_SOCKET = "kv-replay"
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)  # vLLM's ZmqEventPublisher.END_SEQ
# the indexer's sockets, which the replica's workers connect to
CHANGES_SOCKET = "kv-index"  # PUB: [instance, seq, flags, encoded frame] (a heartbeat: no frame)
SNAPSHOT_SOCKET = "kv-snapshot"  # ROUTER: b"snapshot" -> [instance, seq, flags, encoded snapshot]
PENDING_SOCKET = "kv-pending"  # PULL: [b"+", request, keys as int64] and [b"-", request]
HEARTBEAT_S = 0.5
DEGRADED = 1  # flags: the index may miss blocks the engine holds
HIGH_WATER_MARK = 100_000  # messages a socket queues for one peer before it drops (then seen as a gap)
RESTART_AFTER_S = 5.0


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


def address(run_dir: Path, socket: str) -> str:
    return f"ipc://{run_dir}/{socket}"


def pack(instance: bytes, seq: int, degraded: bool, frame: bytes) -> list[bytes]:
    return [instance, seq.to_bytes(8, "big"), bytes([DEGRADED if degraded else 0]), frame]


def unpack(message: list[bytes]) -> tuple[bytes, int, bool, bytes]:
    """(indexer instance, seq, degraded, encoded frame: empty for a heartbeat)"""
    instance, seq, flags, frame = message
    return instance, int.from_bytes(seq, "big"), bool(flags[0] & DEGRADED), frame


class EngineEvents:
    """The engine's event batches into the index, in order: a batch missed is asked of the replay
    socket; when the replay no longer has it, the index starts over (and says it is degraded)."""

    def __init__(self, context, run_dir: Path, index: KvIndex) -> None:
        import msgspec
        import zmq

        self._decode = msgspec.msgpack.Decoder().decode  # untyped: no vLLM import, unknown events skipped
        self.index = index
        self.context = context
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self.socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        self.socket.connect(address(run_dir, EVENTS_SOCKET))
        self.replay_address = address(run_dir, REPLAY_SOCKET)
        self.expected = 0  # the publisher numbers its batches from 0
        self.blocks_stored = 0
        self.live = False  # a batch has come through the subscription (it is in effect)

    def receive(self, most: int = 256) -> None:
        """The batches that have arrived (up to `most`), without waiting."""
        import zmq

        for _ in range(most):
            try:
                _, seq, payload = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.live = True
            self._receive(int.from_bytes(seq, "big"), payload)

    def _receive(self, seq: int, payload: bytes) -> None:
        if seq < self.expected:
            return
        if seq > self.expected:
            self.catch_up(until=seq)
            if seq < self.expected:
                return
        self._deliver(seq, payload)

    def _deliver(self, seq: int, payload: bytes) -> None:
        self.index.apply(self._decode(payload)[1])  # vLLM's EventBatch: [ts, events, ...]
        self.expected = seq + 1

    def _start_over(self, seq: int) -> None:
        logger.warning("KV indexer: batches %d..%d are missing and no longer replayable; the index starts over "
                       "(degraded)", self.expected, seq - 1)
        self.index.start_over()
        self.expected = seq

    def catch_up(self, until: int | None, timeout_ms: int = 1000) -> None:
        """The batches from the next one expected, from the replay socket: those before `until`
        (a batch that came with a gap before it), or all it holds (None: at the start)."""
        for seq, payload in self._replayed(self.expected, timeout_ms):
            if until is not None and seq >= until:
                break
            if seq < self.expected:
                continue
            if seq > self.expected:
                self._start_over(seq)
            self._deliver(seq, payload)
        if until is not None and until > self.expected:
            self._start_over(until)

    def _replayed(self, start: int, timeout_ms: int) -> list[tuple[int, bytes]]:
        """What vLLM's replay socket (a ROUTER) holds from batch `start` on, in order."""
        import zmq

        batches = []
        with self.context.socket(zmq.DEALER) as replay:
            replay.setsockopt(zmq.LINGER, 0)
            replay.connect(self.replay_address)
            replay.send_multipart((b"", start.to_bytes(8, "big")))
            while replay.poll(timeout_ms):
                _, _, seq_bytes, payload = replay.recv_multipart()
                if seq_bytes == END_OF_REPLAY:
                    break
                batches.append((int.from_bytes(seq_bytes, "big"), payload))
        return batches


class KvIndexer:
    """The indexer's loop: engine events and pending keys in, numbered changes and snapshots out."""

    def __init__(self, run_dir: Path, epoch: str | None, capacity: int | None = None,
                 pending_ttl_s: float = 3600.0, adapter_name: Callable[[int], str | None] = lambda lora_id: None,
                 parent: int | None = None) -> None:
        import zmq

        self.epoch, self.pending_ttl_s, self.parent = epoch, pending_ttl_s, parent
        self.index = KvIndex(capacity, adapter_name)
        self.context = zmq.Context()
        self.engine = EngineEvents(self.context, run_dir, self.index)
        self.changes = self.context.socket(zmq.PUB)
        self.changes.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        self.snapshots = self.context.socket(zmq.ROUTER)
        self.pending = self.context.socket(zmq.PULL)
        self.pending.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        for socket, name in ((self.changes, CHANGES_SOCKET), (self.snapshots, SNAPSHOT_SOCKET),
                             (self.pending, PENDING_SOCKET)):
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind(address(run_dir, name))  # (a socket file left by an indexer before is replaced)
        self.instance = os.urandom(8)  # another indexer's numbers are not this one's
        self.seq = 0  # the last change published
        self.stopped = threading.Event()

    def run(self) -> None:
        import zmq

        self.engine.catch_up(until=None)  # what the engine published before this process subscribed
        self.publish()
        poller = zmq.Poller()
        for socket in (self.engine.socket, self.pending, self.snapshots):
            poller.register(socket, zmq.POLLIN)
        beat = time.monotonic()
        try:
            while not self.stopped.is_set():
                ready = dict(poller.poll(max(0, int((beat - time.monotonic()) * 1000))))
                if self.pending in ready:
                    self._take_pending()
                if self.engine.socket in ready:
                    self.engine.receive()
                self.publish()  # before a snapshot: it is the state after change `seq`
                if self.snapshots in ready:
                    self._answer_snapshots()
                if time.monotonic() >= beat:
                    if self.parent is not None and os.getppid() != self.parent:
                        logger.info("KV indexer: the worker that started it is gone; exiting")
                        return
                    if not self.engine.live:  # a batch sent before the subscription took effect is only replayed
                        self.engine.catch_up(until=None, timeout_ms=100)
                    self.index.expire(older_than=time.monotonic() - self.pending_ttl_s)
                    self.publish()
                    self.changes.send_multipart(pack(self.instance, self.seq, self.index.degraded, b""))
                    beat = time.monotonic() + HEARTBEAT_S
        finally:
            self.close()

    def publish(self) -> None:
        frame = self.index.take_change()
        if frame is not None:
            self.seq += 1
            self.changes.send_multipart(pack(self.instance, self.seq, frame.degraded, encode_frame(frame).encode()))

    def _take_pending(self, most: int = 4096) -> None:
        import zmq

        now = time.monotonic()
        for _ in range(most):
            try:
                message = self.pending.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[0] == b"+" and len(message) == 3:
                self.index.wait(message[1].decode(), array("q", message[2]).tolist(), now)
            elif message[0] == b"-" and len(message) == 2:
                self.index.done(message[1].decode())

    def _answer_snapshots(self) -> None:
        import zmq

        snapshot = None  # encoded once for all the requests waiting now
        while True:
            try:
                identity, *_ = self.snapshots.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if snapshot is None:
                snapshot = pack(self.instance, self.seq, self.index.degraded,
                                encode_frame(self.index.snapshot(self.epoch)).encode())
            self.snapshots.send_multipart([identity, *snapshot])

    def close(self) -> None:
        for socket in (self.engine.socket, self.changes, self.snapshots, self.pending):
            socket.close(linger=0)
        self.context.term()


def encode_keys(keys: list[int]) -> bytes:
    """A request's block keys as the pending message carries them (keys are below 2**63)."""
    return array("q", keys).tobytes()


class KvIndexerProcess:
    """Worker 1's KV indexer: a child process, started again RESTART_AFTER_S after it dies (while
    `may_restart()`), which exits by itself once this worker is gone."""

    def __init__(self, run_dir: Path, epoch: str, capacity: int | None, pending_ttl_s: float,
                 adapters: Path | None = None, may_restart: Callable[[], bool] = lambda: True,
                 restart_after_s: float = RESTART_AFTER_S) -> None:
        self.command = [sys.executable, "-m", __name__, "--run-dir", str(run_dir), "--epoch", epoch,
                        "--pending-ttl-s", str(pending_ttl_s), "--parent", str(os.getpid())]
        self.command += ["--capacity", str(capacity)] if capacity is not None else []
        self.command += ["--adapters", str(adapters)] if adapters is not None else []
        self.may_restart, self.restart_after_s = may_restart, restart_after_s
        self.process: subprocess.Popen | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._keep_running, daemon=True, name="KvIndexer")

    def start(self) -> KvIndexerProcess:
        self._thread.start()
        return self

    def _keep_running(self) -> None:
        project = str(Path(__file__).resolve().parents[2])  # `services` is importable from there
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
        while not self._stopped.is_set():
            self.process = subprocess.Popen(self.command, env=environment)
            code = self.process.wait()
            if self._stopped.is_set() or not self.may_restart():
                return
            logger.error("the KV indexer (pid %d) exited with %s; /kv_events says degraded until it is started "
                         "again in %.0f s", self.process.pid, code, self.restart_after_s)
            self._stopped.wait(self.restart_after_s)

    def stop(self) -> None:
        self._stopped.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)
        self._thread.join(5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--epoch", required=True)
    parser.add_argument("--capacity", type=int, default=None, help="blocks the engine's KV cache holds")
    parser.add_argument("--pending-ttl-s", type=float, default=3600.0)
    parser.add_argument("--adapters", type=Path, default=None, help="the LoRA registry (lora ids -> names)")
    parser.add_argument("--parent", type=int, default=None, help="exit when this process is no longer the parent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [kv-indexer:%(process)d] %(levelname)s %(message)s")
    adapter_name: Callable[[int], str | None] = lambda lora_id: None  # noqa: E731
    if args.adapters is not None:
        from services.gpu.lora import AdapterRegistry

        registry = AdapterRegistry.read_only(args.adapters)
        adapter_name = registry.name_of
    indexer = KvIndexer(args.run_dir, args.epoch, args.capacity, args.pending_ttl_s, adapter_name, args.parent)
    logger.info("KV indexer up (epoch %s, %s blocks)", args.epoch, args.capacity)
    indexer.run()


if __name__ == "__main__":
    main()
