"""The replica's index (services/gpu/kv_index.py): vLLM's KV events as block keys, the pending keys
of the requests accepted, whether it is degraded, and each change as one frame. The events are
vLLM's own classes, through msgpack as the engine publishes them: no engine."""

from __future__ import annotations

import time

import msgspec
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from services.gpu.kv_index import KvIndex
from services.kv_blocks import block_keys
from services.protocol import CacheEvents

BLOCK = 4
PROMPT = list(range(100, 100 + 3 * BLOCK + 2))  # three full blocks and two tokens
KEYS = block_keys(PROMPT, BLOCK)


def stored(hashes, tokens, parent=None, lora_id=None, lora_name=None, medium="GPU") -> BlockStored:
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=list(tokens),
                       block_size=BLOCK, lora_id=lora_id, medium=medium, lora_name=lora_name)


def removed(hashes) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(hashes), medium="GPU")


def wire(*events) -> list[dict]:
    """The events as the indexer decodes them from the engine's socket."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(KVEventBatch(ts=time.time(), events=list(events))))[1]


def applied(index: KvIndex, *events) -> CacheEvents | None:
    index.apply(wire(*events))
    return index.take_change()


# --- the engine's blocks -------------------------------------------------------------------------


def test_stored_blocks_get_the_keys_the_front_computes_for_the_prompt():
    index = KvIndex()
    assert applied(index, stored([b"h1", b"h2", b"h3"], PROMPT[:3 * BLOCK])) == CacheEvents(stored=KEYS)
    assert sorted(index.keys()) == sorted(KEYS)


def test_a_block_stored_later_chains_from_its_parents_key():
    index = KvIndex()
    applied(index, stored([11, 12], PROMPT[:2 * BLOCK]))  # vLLM hashes are ints or bytes
    assert applied(index, stored([13], PROMPT[2 * BLOCK:3 * BLOCK], parent=12)).stored == [KEYS[2]]


def test_the_adapter_is_part_of_the_key_by_name_or_by_its_engine_id():
    by_name = applied(KvIndex(), stored([1], PROMPT[:BLOCK], lora_id=3, lora_name="sql"))
    by_id = applied(KvIndex(adapter_name={3: "sql"}.get), stored([1], PROMPT[:BLOCK], lora_id=3))
    assert by_name.stored == by_id.stored == block_keys(PROMPT[:BLOCK], BLOCK, "sql")
    assert by_name.stored != block_keys(PROMPT[:BLOCK], BLOCK)
    assert applied(KvIndex(adapter_name=lambda lora_id: None), stored([1], PROMPT[:BLOCK], lora_id=9)) is None


def test_removed_blocks_and_a_clear_leave_the_index():
    index = KvIndex()
    applied(index, stored([1, 2, 3], PROMPT[:3 * BLOCK]))
    assert applied(index, removed([3])) == CacheEvents(removed=[KEYS[2]])
    assert applied(index, removed([99])) is None  # a block it never knew
    assert applied(index, AllBlocksCleared()) == CacheEvents(cleared=True)
    assert len(index) == 0 and index.keys() == []


def test_a_change_is_only_its_net_effect_whatever_the_batches():
    index = KvIndex()
    assert applied(index, stored([1], PROMPT[:BLOCK]), removed([1])) is None
    applied(index, stored([1], PROMPT[:BLOCK]))
    assert applied(index, removed([1]), stored([1], PROMPT[:BLOCK])) is None
    index.apply(wire(removed([1])))  # two batches, one change
    index.apply(wire(stored([1], PROMPT[:BLOCK])))
    assert index.take_change() is None
    assert applied(index, AllBlocksCleared(), stored([5], PROMPT[:BLOCK])) == CacheEvents(cleared=True, stored=[KEYS[0]])


def test_a_block_whose_parent_is_unknown_is_left_out():
    """After a loss the chain is lost: such a block is not guessed at (a missed hit, never a false one)."""
    index = KvIndex()
    assert applied(index, stored([7], PROMPT[BLOCK:2 * BLOCK], parent=6)) is None
    assert len(index) == 0


def test_offloaded_copies_and_other_events_are_not_the_engines_cache():
    assert applied(KvIndex(), stored([1], PROMPT[:BLOCK], medium="CPU")) is None
    index = KvIndex()
    index.apply([{"type": "SomethingNew", "block_hashes": [1]}])
    assert index.take_change() is None


def test_memory_is_bounded_by_the_blocks_that_exist():
    """Duplicates of one hash and two hashes of one key are counted, so a key goes with its last block."""
    index = KvIndex()
    for round_ in range(50):
        hashes = [f"{round_}-{i}" for i in range(20)]
        tokens = [round_ * 1000 + t for t in range(20 * BLOCK)]
        applied(index, stored(hashes, tokens))
        applied(index, stored(hashes[:1], tokens[:BLOCK]))  # the same hash stored again
        applied(index, removed(hashes), removed(hashes[:1]))
    assert len(index) == 0 and index.keys() == []
    applied(index, stored([b"a"], PROMPT[:BLOCK]), stored([b"b"], PROMPT[:BLOCK]))  # two hashes, one key
    assert applied(index, removed([b"a"])) is None
    assert applied(index, removed([b"b"])) == CacheEvents(removed=KEYS[:1])


# --- pending keys --------------------------------------------------------------------------------


def test_a_requests_keys_are_pending_until_the_engine_stores_them():
    index = KvIndex()
    index.wait("r1", KEYS, now=0)
    assert index.take_change() == CacheEvents(pending=KEYS)
    # the engine stores the first two: held, no longer pending (the request still runs)
    assert applied(index, stored([1, 2], PROMPT[:2 * BLOCK])) == CacheEvents(stored=KEYS[:2], unpending=KEYS[:2])
    assert sorted(index.pending_keys()) == sorted(KEYS[2:])
    # the request ends: what it waited on and the engine does not hold is pending no more
    index.done("r1")
    assert index.take_change() == CacheEvents(unpending=KEYS[2:])
    assert index.pending_keys() == [] and index.requests == 0


def test_a_key_held_already_is_never_pending_and_shared_keys_wait_for_every_request():
    index = KvIndex()
    applied(index, stored([1], PROMPT[:BLOCK]))
    index.wait("a", KEYS[:2], now=0)
    index.wait("b", KEYS[:2], now=0)
    assert index.take_change() == CacheEvents(pending=[KEYS[1]])
    index.done("a")
    assert index.take_change() is None  # b still waits on it
    index.done("b")
    index.done("b")  # an end heard twice, or of a request never announced: nothing
    index.done("never")
    assert index.take_change() == CacheEvents(unpending=[KEYS[1]])


def test_a_request_announced_and_ended_between_two_changes_is_no_change():
    index = KvIndex()
    index.wait("r", KEYS, now=0)
    index.done("r")
    assert index.take_change() is None


def test_blocks_evicted_while_a_request_waits_on_them_are_pending_again_and_a_clear_says_so():
    index = KvIndex()
    index.wait("r", KEYS[:1], now=0)
    applied(index, stored([1], PROMPT[:BLOCK]))
    assert applied(index, removed([1])) == CacheEvents(removed=KEYS[:1], pending=KEYS[:1])
    applied(index, stored([1], PROMPT[:BLOCK]))
    # a clear is the whole state again: nothing held, what requests wait on pending
    assert applied(index, AllBlocksCleared()) == CacheEvents(cleared=True, pending=KEYS[:1])


def test_requests_whose_end_is_never_heard_expire():
    index = KvIndex()
    index.wait("old", KEYS[:1], now=10)
    index.wait("new", KEYS[1:2], now=20)
    index.take_change()
    index.expire(older_than=15)
    assert index.take_change() == CacheEvents(unpending=KEYS[:1])
    assert index.pending_keys() == [KEYS[1]]


# --- degraded, and the snapshot ------------------------------------------------------------------


def test_after_a_loss_the_index_is_degraded_until_a_caches_worth_of_blocks_is_stored():
    index = KvIndex(capacity=3)
    applied(index, stored([1], PROMPT[:BLOCK]))
    index.wait("r", KEYS, now=0)
    index.take_change()
    index.start_over()
    # the whole state again: nothing held, everything waited on pending, degraded
    assert index.take_change() == CacheEvents(cleared=True, pending=KEYS, degraded=True)
    # a block on a parent lost with the gap does not count: it is not in the index
    assert applied(index, stored([8], PROMPT[BLOCK:2 * BLOCK], parent=7)) is None
    frame = applied(index, stored([1, 2], PROMPT[:2 * BLOCK]))
    assert frame == CacheEvents(stored=KEYS[:2], unpending=KEYS[:2], degraded=True)
    assert applied(index, stored([3], PROMPT[2 * BLOCK:3 * BLOCK], parent=2)) == CacheEvents(
        stored=[KEYS[2]], unpending=[KEYS[2]])  # three blocks taken since: whole again
    assert not index.degraded


def test_a_clear_makes_a_degraded_index_whole_and_a_change_of_degraded_alone_is_a_frame():
    index = KvIndex()  # capacity unknown: only a clear ends it
    index.start_over()
    assert index.take_change() == CacheEvents(cleared=True, degraded=True)
    applied(index, *[stored([i], [i] * BLOCK) for i in range(100)])
    assert index.degraded
    index.apply(wire(AllBlocksCleared()))
    assert index.take_change() == CacheEvents(cleared=True) and not index.degraded
    index.degraded = True  # (as a loss would)
    assert index.take_change() == CacheEvents(degraded=True)


def test_the_snapshot_is_the_whole_state_with_the_epoch():
    index = KvIndex()
    applied(index, stored([1], PROMPT[:BLOCK]))
    index.wait("r", KEYS[:2], now=0)
    assert index.snapshot("e1") == CacheEvents(cleared=True, epoch="e1", stored=KEYS[:1], pending=KEYS[1:2])
