"""The replica's KV indexer (services/gpu/kv_indexer.py) between vLLM's own ZMQ publisher (no
engine) and its workers' sockets: replayed and lost batches, numbered changes that bring a
snapshot up to date, pending keys, heartbeats, and the process's life beside its worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import zmq
from kv_plane import BLOCK, KEYS, PROMPT, IndexerThread, View, batch, publisher, short_run_dir, stored, wait_for

from services.gpu.kv_events import fetch_snapshot
from services.gpu.kv_indexer import (
    CHANGES_SOCKET,
    HEARTBEAT_S,
    PENDING_SOCKET,
    SNAPSHOT_SOCKET,
    KvIndexerProcess,
    address,
    encode_keys,
    unpack,
)
from services.protocol import CacheEvents

CHAIN = [stored([1], PROMPT[:BLOCK]), stored([2], PROMPT[BLOCK:2 * BLOCK], parent=1),
         stored([3], PROMPT[2 * BLOCK:3 * BLOCK], parent=2)]


@pytest.fixture
def run_dir():
    return short_run_dir()


@pytest.fixture
def engine(run_dir):
    made = []

    def make(**kwargs):
        made.append(publisher(run_dir, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.shutdown()


@pytest.fixture
def indexers():
    started: list[IndexerThread] = []
    yield started
    for each in started:
        each.stop()


def snapshot(run_dir) -> tuple[bytes, int, bool, CacheEvents]:
    reply = fetch_snapshot(zmq.Context.instance(), address(run_dir, SNAPSHOT_SOCKET), timeout_s=5)
    assert reply is not None, "the indexer did not answer"
    instance, seq, degraded, frame = reply
    return instance, seq, degraded, CacheEvents.model_validate_json(frame)


class Changes:
    """A worker's subscription to the indexer's changes and heartbeats."""

    def __init__(self, run_dir) -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address(run_dir, CHANGES_SOCKET))
        self.messages: list[tuple[bytes, int, bool, bytes, float]] = []

    def read(self, until, within_s: float = 10) -> bool:
        deadline = time.monotonic() + within_s
        while not until(self) and time.monotonic() < deadline:
            if self.socket.poll(50):
                self.messages.append((*unpack(self.socket.recv_multipart()), time.monotonic()))
        return until(self)

    def changes(self) -> list[tuple[int, CacheEvents]]:
        return [(seq, CacheEvents.model_validate_json(frame)) for _, seq, _, frame, _ in self.messages if frame]

    def heartbeats(self) -> list[tuple[int, float]]:
        return [(seq, at) for _, seq, _, frame, at in self.messages if not frame]


def test_batches_published_before_the_indexer_started_are_replayed(run_dir, engine, indexers):
    pub = engine()
    for event in CHAIN:
        pub.publish(batch(event))
    assert wait_for(lambda: len(pub._buffer) == 3)
    indexers.append(IndexerThread(run_dir, epoch="e1"))
    _, _, degraded, frame = snapshot(run_dir)
    assert frame == CacheEvents(cleared=True, epoch="e1", stored=KEYS) and not degraded


def test_batches_sent_before_the_subscription_took_effect_are_replayed(run_dir, engine, indexers):
    indexers.append(IndexerThread(run_dir, epoch="e1"))
    snapshot(run_dir)  # the indexer is past its first catch-up, subscribed to an engine not there yet
    pub = engine()  # the engine binds and publishes at once: before the subscription reconnects
    for event in CHAIN:
        pub.publish(batch(event))
    # no later batch reveals the gap: only the replay brings them
    assert wait_for(lambda: snapshot(run_dir)[3].stored == KEYS, within_s=5, every_s=0.2)


def test_a_gap_the_replay_no_longer_holds_makes_the_index_degraded(run_dir, engine, indexers):
    pub = engine(buffer_steps=2)  # keeps the last two batches only: the first two are gone
    for event in [*CHAIN, stored([9], PROMPT[:BLOCK])]:
        pub.publish(batch(event))
    assert wait_for(lambda: next(iter(pub._buffer), (0,))[0] == 2)
    indexers.append(IndexerThread(run_dir, capacity=100))
    _, _, degraded, frame = snapshot(run_dir)
    # block 3 chains from a parent it never saw: left out, not guessed; block 9 starts a chain
    assert degraded and frame.degraded and frame.stored == [KEYS[0]]


def test_a_snapshot_and_the_changes_numbered_after_it_give_the_index(run_dir, engine, indexers):
    """What a worker does for a stream: a snapshot at seq S, then the changes numbered after S,
    applied in order, give what a fresh snapshot gives; the heartbeats carry the last number."""
    pub = engine()
    indexers.append(IndexerThread(run_dir))
    changes = Changes(run_dir)
    pub.publish(batch(CHAIN[0]))
    assert wait_for(lambda: snapshot(run_dir)[3].stored == [KEYS[0]])
    changes.read(lambda seen: seen.heartbeats())  # subscribed (ZMQ's slow joiner)
    _, seq, _, first = snapshot(run_dir)
    for event in CHAIN[1:]:
        pub.publish(batch(event))
        time.sleep(0.2)  # (batches that arrive together make one change)
    _, last, _, final = snapshot(run_dir)
    assert changes.read(lambda seen: any(number == last for number, _ in seen.changes()))
    numbers = [number for number, frame in changes.changes() if number > seq]
    assert numbers == list(range(seq + 1, last + 1)) and last > seq, "numbered one by one"
    view = View()
    view.apply(first)
    for number, frame in changes.changes():
        if number > seq:
            view.apply(frame)
    assert view.keys == set(KEYS) == set(final.stored)
    assert changes.read(lambda seen: seen.heartbeats()[-1][0] == last, within_s=2)


def test_pending_keys_come_from_the_workers_and_leave_when_stored_or_done(run_dir, engine, indexers):
    pub = engine()
    indexers.append(IndexerThread(run_dir))
    changes = Changes(run_dir)
    changes.read(lambda seen: seen.heartbeats())
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(address(run_dir, PENDING_SOCKET))
    push.send_multipart([b"+", b"0/r1", encode_keys(KEYS)])
    assert changes.read(lambda seen: any(frame.pending for _, frame in seen.changes()))
    assert changes.changes()[-1][1] == CacheEvents(pending=KEYS)
    assert snapshot(run_dir)[3] == CacheEvents(cleared=True, epoch="epoch-1", pending=KEYS)
    pub.publish(batch(CHAIN[0]))
    assert changes.read(lambda seen: any(frame.stored for _, frame in seen.changes()))
    assert changes.changes()[-1][1] == CacheEvents(stored=KEYS[:1], unpending=KEYS[:1])
    push.send_multipart([b"-", b"0/r1"])
    assert changes.read(lambda seen: changes.changes()[-1][1] == CacheEvents(unpending=KEYS[1:]))
    push.close()


def test_a_heartbeat_every_half_second(run_dir, engine, indexers):
    engine()
    indexers.append(IndexerThread(run_dir))
    changes = Changes(run_dir)
    assert changes.read(lambda seen: len(seen.heartbeats()) >= 4, within_s=5)
    beats = [at for _, at in changes.heartbeats()]
    assert max(b - a for a, b in zip(beats, beats[1:])) < 2 * HEARTBEAT_S


def test_the_indexer_process_exits_when_its_worker_is_gone(run_dir):
    """`--parent` names the process that started it: another parent (here: this test's parent
    is not the indexer's) ends it at its next heartbeat."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "services.gpu.kv_indexer", "--run-dir", str(run_dir),
                           "--epoch", "e", "--parent", str(os.getppid())], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the worker that started it is gone" in done.stderr and time.monotonic() - started < 30


def test_a_dead_indexer_is_started_again(run_dir, engine):
    engine()
    process = KvIndexerProcess(run_dir, "e", capacity=None, pending_ttl_s=60, restart_after_s=0.2).start()
    try:
        first = wait_for(lambda: process.process)
        assert wait_for(lambda: fetch_snapshot(zmq.Context.instance(), address(run_dir, SNAPSHOT_SOCKET), 1), 30)
        first.kill()
        second = wait_for(lambda: process.process is not first and process.process, within_s=10)
        assert second and second.pid != first.pid
        assert wait_for(lambda: fetch_snapshot(zmq.Context.instance(), address(run_dir, SNAPSHOT_SOCKET), 1), 30)
    finally:
        process.stop()
    assert process.process.poll() is not None
