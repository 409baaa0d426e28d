"""The engine's KV cache events as block keys (services/gpu/kv_events.py), fed vLLM's own event
classes and, for the sequence and its gaps, vLLM's own ZMQ publisher: no engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, ZmqEventPublisher

from services.gpu import kv_events
from services.gpu.kv_events import KvEventHub, KvEventSubscriber, KvIndex
from services.kv_blocks import block_keys
from services.protocol import CacheEvents

BLOCK = 4
PROMPT = list(range(100, 100 + 3 * BLOCK + 2))  # three full blocks and two tokens


def stored(hashes, tokens, parent=None, lora_id=None, lora_name=None, medium="GPU") -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                       block_size=BLOCK, lora_id=lora_id, medium=medium, lora_name=lora_name)


def removed(hashes) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(hashes), medium="GPU")


def test_stored_blocks_get_the_keys_the_front_computes_for_the_prompt():
    index = KvIndex()
    frame = index.apply([stored([b"h1", b"h2", b"h3"], PROMPT[:3 * BLOCK])])
    assert frame == CacheEvents(stored=block_keys(PROMPT, BLOCK))
    assert sorted(index.keys()) == sorted(block_keys(PROMPT, BLOCK))


def test_a_block_stored_later_chains_from_its_parents_key():
    index = KvIndex()
    index.apply([stored([11, 12], PROMPT[:2 * BLOCK])])  # vLLM hashes are ints or bytes
    frame = index.apply([stored([13], PROMPT[2 * BLOCK:3 * BLOCK], parent=12)])
    assert frame.stored == [block_keys(PROMPT, BLOCK)[2]]


def test_the_adapter_is_part_of_the_key_by_name_or_by_its_engine_id():
    by_name = KvIndex().apply([stored([1], PROMPT[:BLOCK], lora_id=3, lora_name="sql")])
    by_id = KvIndex(adapter_name={3: "sql"}.get).apply([stored([1], PROMPT[:BLOCK], lora_id=3)])
    assert by_name.stored == by_id.stored == block_keys(PROMPT[:BLOCK], BLOCK, "sql")
    assert by_name.stored != block_keys(PROMPT[:BLOCK], BLOCK)
    assert KvIndex(adapter_name=lambda lora_id: None).apply([stored([1], PROMPT[:BLOCK], lora_id=9)]) is None


def test_removed_blocks_and_a_clear_leave_the_index():
    index = KvIndex()
    keys = block_keys(PROMPT, BLOCK)
    index.apply([stored([1, 2, 3], PROMPT[:3 * BLOCK])])
    assert index.apply([removed([3])]) == CacheEvents(removed=[keys[2]])
    assert index.apply([removed([99])]) is None  # a block it never knew
    assert index.apply([AllBlocksCleared()]) == CacheEvents(cleared=True)
    assert len(index) == 0 and index.keys() == []


def test_a_batch_reports_only_its_net_change():
    index = KvIndex()
    keys = block_keys(PROMPT, BLOCK)
    assert index.apply([stored([1], PROMPT[:BLOCK]), removed([1])]) is None
    index.apply([stored([1], PROMPT[:BLOCK])])
    assert index.apply([removed([1]), stored([1], PROMPT[:BLOCK])]) is None
    frame = index.apply([AllBlocksCleared(), stored([5], PROMPT[:BLOCK])])
    assert frame == CacheEvents(cleared=True, stored=[keys[0]])


def test_a_block_whose_parent_is_unknown_is_left_out():
    """After a gap the chain is lost: such a block is not guessed at (a missed hit, never a false one)."""
    index = KvIndex()
    assert index.apply([stored([7], PROMPT[BLOCK:2 * BLOCK], parent=6)]) is None
    assert len(index) == 0


def test_offloaded_copies_are_not_the_engines_cache():
    assert KvIndex().apply([stored([1], PROMPT[:BLOCK], medium="CPU")]) is None


def test_memory_is_bounded_by_the_blocks_that_exist():
    """Duplicates of one hash and two hashes of one key are counted, so a key goes with its last block."""
    index = KvIndex()
    for round_ in range(50):
        hashes = [f"{round_}-{i}" for i in range(20)]
        tokens = [round_ * 1000 + t for t in range(20 * BLOCK)]
        index.apply([stored(hashes, tokens)])
        index.apply([stored(hashes[:1], tokens[:BLOCK])])  # the same hash stored again
        index.apply([removed(hashes), removed(hashes[:1])])
    assert len(index) == 0 and index.keys() == []
    index.apply([stored([b"a"], PROMPT[:BLOCK]), stored([b"b"], PROMPT[:BLOCK])])  # two hashes, one key
    assert index.apply([removed([b"a"])]) is None
    assert index.apply([removed([b"b"])]) == CacheEvents(removed=block_keys(PROMPT[:BLOCK], BLOCK))


def test_a_stream_starts_with_a_snapshot_and_a_slow_one_gets_a_new_snapshot(monkeypatch):
    async def run():
        hub = KvEventHub(KvIndex())
        hub.apply([stored([1], PROMPT[:BLOCK])])
        stream = hub.open()
        hub.apply([stored([2], PROMPT[BLOCK:2 * BLOCK], parent=1)])
        keys = block_keys(PROMPT, BLOCK)
        assert stream.take(hub.index) == [CacheEvents(cleared=True, stored=[keys[0]]), CacheEvents(stored=[keys[1]])]
        stream.max_pending = 2
        for _ in range(3):
            hub.apply([removed([2])])
            hub.apply([stored([2], PROMPT[BLOCK:2 * BLOCK], parent=1)])
        assert stream.take(hub.index) == [CacheEvents(cleared=True, stored=keys[:2])]
        hub.close(stream)
        assert hub.streams == 0

    asyncio.run(run())


# --- the sequence of batches, with vLLM's own publisher ------------------------------------------


def batch(*events) -> KVEventBatch:
    return KVEventBatch(ts=time.time(), events=list(events))


def publisher(run_dir: Path, buffer_steps: int = 10_000) -> ZmqEventPublisher:
    config = kv_events.kv_events_config(run_dir)
    return ZmqEventPublisher(0, endpoint=config.endpoint, replay_endpoint=config.replay_endpoint,
                             buffer_steps=buffer_steps, topic=config.topic)


def wait_for(check, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def subscribe(pub: ZmqEventPublisher, run_dir: Path, until) -> tuple[list[int], bool]:
    """Subscribe after `pub` has published; the keys the subscriber's index holds once
    `until(subscriber)` holds (or 10 s have passed), and whether it started over."""
    cleared = []

    async def run():
        hub = KvEventHub(KvIndex())
        original_clear = hub.clear
        hub.clear = lambda: (cleared.append(True), original_clear())
        subscriber = KvEventSubscriber(run_dir, hub, asyncio.get_running_loop())
        try:
            deadline = time.monotonic() + 10
            while not until(subscriber) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)  # the last batch's apply, queued on this loop
            return sorted(hub.index.keys())
        finally:
            subscriber.stop()

    return asyncio.run(run()), bool(cleared)


@pytest.fixture
def run_dir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="kv-"))  # short: a Unix socket path


@pytest.fixture
def pub_factory(run_dir):
    made = []

    def make(**kwargs):
        made.append(publisher(run_dir, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.shutdown()


def test_batches_published_before_the_subscription_are_replayed(run_dir, pub_factory):
    pub = pub_factory()
    keys = block_keys(PROMPT, BLOCK)
    published = [stored([1], PROMPT[:BLOCK]), stored([2], PROMPT[BLOCK:2 * BLOCK], parent=1),
                 stored([3], PROMPT[2 * BLOCK:3 * BLOCK], parent=2)]
    for event in published:
        pub.publish(batch(event))
    assert wait_for(lambda: len(pub._buffer) == 3)
    got, started_over = subscribe(pub, run_dir, until=lambda sub: sub.sequence.expected == 3)
    assert got == sorted(keys) and not started_over


def test_a_gap_the_replay_no_longer_holds_starts_the_index_over(run_dir, pub_factory):
    pub = pub_factory(buffer_steps=2)  # keeps the last two batches only: the first two are gone
    published = [stored([1], PROMPT[:BLOCK]), stored([2], PROMPT[BLOCK:2 * BLOCK], parent=1),
                 stored([3], PROMPT[2 * BLOCK:3 * BLOCK], parent=2), stored([9], PROMPT[:BLOCK])]
    for event in published:
        pub.publish(batch(event))
    assert wait_for(lambda: next(iter(pub._buffer), (0,))[0] == 2)
    got, started_over = subscribe(pub, run_dir, until=lambda sub: sub.sequence.expected == 4)
    # block 3 chains from a parent it never saw: left out, not guessed; block 9 starts a chain
    assert started_over and got == [block_keys(PROMPT, BLOCK)[0]]
