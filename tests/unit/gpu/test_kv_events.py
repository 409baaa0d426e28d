"""Each worker's relay of the replica's KV indexer to its /kv_events streams
(services/gpu/kv_events.py), with a real indexer (in a thread) fed by vLLM's own publisher: no
engine. Two relays stand for two workers of one replica."""

from __future__ import annotations

import asyncio
import time

import pytest
from kv_plane import BLOCK, KEYS, PROMPT, IndexerThread, View, batch, publisher, short_run_dir, stored

from services.gpu import kv_events
from services.gpu.kv_events import DEADLINE_S, LOAD_ANYWAY_S, KvEventRelay
from services.protocol import CacheEvents, ReplicaLoad

CHAIN = [stored([1], PROMPT[:BLOCK]), stored([2], PROMPT[BLOCK:2 * BLOCK], parent=1),
         stored([3], PROMPT[2 * BLOCK:3 * BLOCK], parent=2)]


class Load:
    def __init__(self) -> None:
        self.now = ReplicaLoad()

    def __call__(self) -> ReplicaLoad:
        return self.now


async def read(stream, view: View, until, within_s: float = 10) -> bool:
    """Feed `view` from `stream` until `until(view)` holds or `within_s` has passed."""
    deadline = time.monotonic() + within_s
    while not until(view) and time.monotonic() < deadline:
        view.feed(await stream.take(0.05))
    return bool(until(view))


async def sent(send, within_s: float = 5) -> bool:
    """`send()` (a relay's pending or done) until the relay's socket to the indexer is connected:
    before then a message is dropped, by design."""
    deadline = time.monotonic() + within_s
    while not (done := send()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return done


@pytest.fixture
def plane():
    """A run directory with an engine (vLLM's publisher) and an indexer; relays made on demand."""

    class Plane:
        def __init__(self) -> None:
            self.run_dir = short_run_dir()
            self.engine = publisher(self.run_dir)
            self.indexer: IndexerThread | None = IndexerThread(self.run_dir, epoch="e1")
            self.relays: list[KvEventRelay] = []
            self.load = Load()

        def relay(self, worker: int = 0) -> KvEventRelay:
            self.relays.append(KvEventRelay(self.run_dir, "e1", self.load, worker=worker).start())
            return self.relays[-1]

        def close(self) -> None:
            for relay in self.relays:
                relay.stop()
            if self.indexer is not None:
                self.indexer.stop()
            self.engine.shutdown()

    made = Plane()
    yield made
    made.close()


def test_streams_on_two_workers_and_a_late_one_see_the_same_frames(plane):
    async def run():
        first = plane.relay(worker=0)
        a, seen_a = first.open(), View()
        assert await read(a, seen_a, lambda view: view.frames)
        assert seen_a.frames[0] == CacheEvents(cleared=True, epoch="e1")  # the snapshot first
        plane.engine.publish(batch(CHAIN[0]))
        assert await read(a, seen_a, lambda view: view.keys == {KEYS[0]})
        late = plane.relay(worker=1)  # a worker that starts after the changes began
        b, seen_b = late.open(), View()
        assert await read(b, seen_b, lambda view: view.keys == {KEYS[0]})
        assert seen_b.frames[0] == CacheEvents(cleared=True, epoch="e1", stored=[KEYS[0]])
        marks = len(seen_a.frames), len(seen_b.frames)
        for event in CHAIN[1:]:
            plane.engine.publish(batch(event))
        assert await read(a, seen_a, lambda view: view.keys == set(KEYS))
        assert await read(b, seen_b, lambda view: view.keys == set(KEYS))
        changes = [[frame for frame in view.frames[mark:] if frame.load is None]
                   for view, mark in zip((seen_a, seen_b), marks)]
        assert changes[0] == changes[1] and changes[0], "the same changes, in the same frames"
        assert not seen_a.degraded and not seen_b.degraded

    asyncio.run(run())


def test_a_stream_opened_again_starts_on_a_snapshot_of_now(plane):
    async def run():
        relay = plane.relay()
        stream, view = relay.open(), View()
        assert await sent(lambda: relay.pending("r1", KEYS))
        for event in CHAIN[:2]:
            plane.engine.publish(batch(event))
        assert await read(stream, view, lambda seen: seen.keys == set(KEYS[:2]) and seen.pending == {KEYS[2]})
        relay.close(stream)
        again, fresh = relay.open(), View()
        assert await read(again, fresh, lambda seen: seen.frames)
        assert fresh.frames[0] == CacheEvents(cleared=True, epoch="e1", stored=KEYS[:2], pending=[KEYS[2]])
        assert relay.streams == {again}

    asyncio.run(run())


def test_a_workers_pending_keys_show_on_every_stream_until_stored_or_done(plane):
    async def run():
        one, two = plane.relay(worker=0), plane.relay(worker=1)
        stream, view = two.open(), View()
        assert await read(stream, view, lambda seen: seen.frames)
        assert await sent(lambda: one.pending("r1", KEYS))
        assert await read(stream, view, lambda seen: seen.pending == set(KEYS))
        plane.engine.publish(batch(CHAIN[0]))
        assert await read(stream, view, lambda seen: seen.keys == {KEYS[0]} and seen.pending == set(KEYS[1:]))
        # the same request id on another worker: another request
        assert await sent(lambda: two.pending("r1", KEYS[1:2]))
        one.done("r1")
        assert await read(stream, view, lambda seen: seen.pending == {KEYS[1]})
        two.done("r1")
        assert await read(stream, view, lambda seen: not seen.pending)

    asyncio.run(run())


def test_the_indexer_gone_makes_every_frame_degraded_and_a_new_one_brings_a_snapshot(plane):
    async def run():
        relay = plane.relay()
        stream, view = relay.open(), View()
        plane.engine.publish(batch(CHAIN[0]))
        assert await read(stream, view, lambda seen: seen.keys == {KEYS[0]})
        plane.indexer.stop()  # gone: no change, no heartbeat
        gone_at = time.monotonic()
        assert await read(stream, view, lambda seen: seen.degraded, within_s=DEADLINE_S + 2)
        assert time.monotonic() - gone_at < DEADLINE_S + 1
        # the stream goes on, a frame at least every second, each saying degraded
        mark = len(view.frames)
        await read(stream, view, lambda seen: False, within_s=2.5)
        later = view.frames[mark:]
        assert later and all(frame.degraded and frame.load is not None for frame in later)
        gaps = [b - a for a, b in zip(view.times[mark - 1:], view.times[mark:])]
        assert max(gaps) < LOAD_ANYWAY_S + 0.5
        assert view.keys == {KEYS[0]}, "what it knew stays (degraded), nothing is cleared"
        # a new indexer (another instance): the replay gives it the whole history, so a fresh,
        # whole snapshot, and the frames stop saying degraded
        plane.engine.publish(batch(CHAIN[1]))
        plane.indexer = IndexerThread(plane.run_dir, epoch="e1")
        mark = len(view.frames)
        assert await read(stream, view, lambda seen: not seen.degraded and seen.keys == set(KEYS[:2]))
        assert any(frame.cleared for frame in view.frames[mark:])

    asyncio.run(run())


def test_a_stream_opened_without_an_indexer_starts_empty_and_degraded(plane):
    async def run():
        plane.indexer.stop()
        plane.indexer = None
        relay = plane.relay()
        stream, view = relay.open(), View()
        assert await read(stream, view, lambda seen: len(seen.frames) >= 2, within_s=3)
        assert view.frames[0] == CacheEvents(cleared=True, epoch="e1", degraded=True)
        assert view.frames[1].load is not None and view.frames[1].degraded
        plane.indexer = IndexerThread(plane.run_dir, epoch="e1")
        plane.engine.publish(batch(CHAIN[0]))
        assert await read(stream, view, lambda seen: not seen.degraded and seen.keys == {KEYS[0]})

    asyncio.run(run())


def test_the_load_goes_out_when_it_changes_and_at_least_every_second(plane):
    async def run():
        relay = plane.relay()
        stream, view = relay.open(), View()
        await read(stream, view, lambda seen: False, within_s=3.2)
        loads = [at for frame, at in zip(view.frames, view.times) if frame.load is not None]
        assert len(loads) >= 3 and max(b - a for a, b in zip(loads, loads[1:])) < LOAD_ANYWAY_S + 0.3
        plane.load.now = ReplicaLoad(running=2, prefill_tokens=300)
        changed = time.monotonic()
        assert await read(stream, view, lambda seen: seen.frames[-1].load == plane.load.now, within_s=2)
        assert time.monotonic() - changed < 0.8  # read every 0.25 s; the periodic frame would take up to 1 s

    asyncio.run(run())


def test_a_stream_that_falls_behind_gets_a_fresh_snapshot(plane, monkeypatch):
    monkeypatch.setattr(kv_events, "MAX_QUEUED", 3)

    async def run():
        relay = plane.relay()
        stream, view = relay.open(), View()
        assert await read(stream, view, lambda seen: seen.frames)
        for i in range(10):  # ten changes the reader does not take
            plane.engine.publish(batch(stored([100 + i], [i] * BLOCK)))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert len(stream.chunks) <= 3
        expected = {key for i in range(10) for key in stored_keys(i)}
        assert await read(stream, view, lambda seen: seen.keys == expected)
        assert any(frame.cleared for frame in view.frames[1:])

    asyncio.run(run())


def stored_keys(i: int) -> list[int]:
    from services.kv_blocks import block_keys

    return block_keys([i] * BLOCK, BLOCK)


def test_a_change_lost_on_the_way_brings_a_fresh_snapshot(plane):
    async def run():
        relay = plane.relay()
        stream, view = relay.open(), View()
        plane.engine.publish(batch(CHAIN[0]))
        assert await read(stream, view, lambda seen: seen.keys == {KEYS[0]})
        assert await read(stream, view, lambda seen: relay.seq is not None, within_s=5)  # a heartbeat heard
        mark = len(view.frames)
        # as if change seq+1 had been dropped on the way: seq+2 arrives first
        relay.heard([(relay.instance, relay.seq + 2, False, b'{"stored":[42]}\n')])
        assert await read(stream, view, lambda seen: any(frame.cleared for frame in seen.frames[mark:]))
        assert view.keys == {KEYS[0]}, "the frame after the gap is not passed on; the snapshot is the truth"

    asyncio.run(run())
