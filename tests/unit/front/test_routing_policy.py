"""The router's arithmetic, without a network: the KV index's bounds and expiry, and each policy's
choice (prefix affinity, load, saturation guards, ties, spread). services/front/routing/."""

from __future__ import annotations

import random

import pytest

from services.front.routing.index import BlockIndex
from services.front.routing.policy import KvAware, LeastLoaded, Prompt, RoundRobin, Weights, kv_cost, make_policy
from services.front.routing.replica import Replica
from services.kv_blocks import block_keys
from services.protocol import CacheEvents, ModelInfo, ReplicaLoad

BLOCK = 4
NOW = 1000.0


def replica(port: int, *, block_size: int | None = BLOCK, capacity: int = 64, live: bool = True,
            load: ReplicaLoad | None = None) -> Replica:
    """A ready replica with an index fed by (pretend) engine events, and no connection."""
    made = Replica(f"http://10.0.0.{port}:3000", token="t" * 16, timeout_s=5, check_interval_s=1, retry_after_s=1,
                   on_change=lambda *_: None)
    made.monitor.ready = True
    made.use(ModelInfo(model="m", max_model_len=2048, vocab_size=100, kv_block_size=block_size,
                       kv_cache_blocks=capacity, kv_events=live))
    if made.index is not None and live:
        made.index.apply(CacheEvents(cleared=True))
    made.report(load)
    return made


def holding(made: Replica, tokens: list[int], adapter: str | None = None) -> Replica:
    made.index.apply(CacheEvents(stored=block_keys(tokens, BLOCK, adapter)))
    return made


PREFIX = list(range(10, 42))  # 32 tokens: 8 blocks


# --- the index -------------------------------------------------------------------------------------


def test_the_index_counts_the_leading_blocks_held_and_follows_the_engines_events():
    index = BlockIndex(capacity=100)
    keys = block_keys(PREFIX, BLOCK)
    index.apply(CacheEvents(cleared=True, stored=keys[:5]))
    assert index.cached_prefix(keys, NOW) == 5
    index.apply(CacheEvents(removed=[keys[2]]))
    assert index.cached_prefix(keys, NOW) == 2  # a hole ends the prefix: the engine reuses only a chain
    index.apply(CacheEvents(cleared=True, stored=[keys[0]]))  # a new snapshot replaces everything
    assert index.cached_prefix(keys, NOW) == 1
    assert index.cached_prefix(block_keys(PREFIX, BLOCK, adapter="sql"), NOW) == 0  # the adapter is in the key


def test_routed_blocks_count_as_held_until_confirmed_or_expired():
    index = BlockIndex(capacity=100, prediction_ttl_s=2.0)
    index.apply(CacheEvents(cleared=True))
    keys = block_keys(PREFIX, BLOCK)
    index.routed(keys, NOW)
    assert index.cached_prefix(keys, NOW + 1.9) == len(keys)
    assert index.cached_prefix(keys, NOW + 2.1) == 0  # expired: the engine never said it stored them
    index.routed(keys, NOW + 3)
    index.apply(CacheEvents(stored=keys[:3]))  # confirmed: now held, no longer a prediction
    assert set(index.predicted) == set(keys[3:])
    assert index.cached_prefix(keys, NOW + 10) == 3


def test_the_index_stays_within_the_replicas_capacity():
    index = BlockIndex(capacity=10, prediction_ttl_s=60)
    index.apply(CacheEvents(cleared=True))
    for start in range(0, 400, 4):
        index.routed(block_keys(list(range(start, start + 8)), BLOCK), NOW)
    assert len(index.history) == 10 and len(index.predicted) <= 10
    index.routed([1, 2], NOW + 120)  # routing again drops what expired
    assert set(index.predicted) == {1, 2}


def test_without_events_the_routing_history_stands_in_lru_bounded():
    index = BlockIndex(capacity=8)
    first, second = block_keys(PREFIX, BLOCK), block_keys(list(range(100, 132)), BLOCK)
    index.routed(first, NOW)
    assert index.cached_prefix(first, NOW + 3600) == 8  # history does not expire
    index.routed(second, NOW)  # 8 more blocks: the first prompt's are the least recently routed
    assert index.cached_prefix(first, NOW) == 0 and index.cached_prefix(second, NOW) == 8
    index.apply(CacheEvents(cleared=True, stored=first))  # a stream's snapshot: the engine's word counts
    assert index.cached_prefix(first, NOW) == 8 and index.cached_prefix(second, NOW) == 0
    index.events_lost()
    assert index.cached_prefix(second, NOW) == 8


def test_pending_blocks_count_as_held_until_stored_or_unpended():
    """A replica's pending blocks (requests it accepted, from any front) count as held: the
    snapshot's replace the set, later frames add and drop them, a stored block leaves it."""
    index = BlockIndex(capacity=100)
    keys = block_keys(PREFIX, BLOCK)
    index.apply(CacheEvents(cleared=True, stored=keys[:2], pending=keys[2:5]))
    assert index.cached_prefix(keys, NOW) == 5
    index.apply(CacheEvents(pending=keys[5:7]))
    assert index.cached_prefix(keys, NOW) == 7
    index.apply(CacheEvents(unpending=[keys[3]]))  # that request ended before its blocks were stored
    assert index.cached_prefix(keys, NOW) == 3
    index.apply(CacheEvents(stored=keys[2:4]))
    assert index.cached_prefix(keys, NOW) == 7 and keys[2] not in index.pending
    index.apply(CacheEvents(cleared=True, pending=keys[4:7]))  # a cleared frame is a snapshot: held and pending
    assert index.cached_prefix(keys, NOW) == 0 and index.pending == set(keys[4:7])
    index.apply(CacheEvents(cleared=True))
    assert index.pending == set()
    index.events_lost()
    index.apply(CacheEvents(cleared=True, pending=[keys[0]]))  # a new stream's snapshot replaces the set
    assert index.pending == {keys[0]} and index.cached_prefix(keys, NOW) == 1


def test_a_degraded_index_adds_this_workers_history_and_predictions_to_what_it_reports():
    index = BlockIndex(capacity=100, prediction_ttl_s=1.0)
    keys = block_keys(PREFIX, BLOCK)
    index.apply(CacheEvents(cleared=True, stored=keys[:2]))
    index.routed(keys[:6], NOW)
    assert index.cached_prefix(keys, NOW + 5) == 2  # the predictions expired: the replica's word alone
    index.apply(CacheEvents(degraded=True))  # its index may miss blocks: the history joins in
    assert index.cached_prefix(keys, NOW + 5) == 6
    index.apply(CacheEvents(load=ReplicaLoad()))  # every frame says: whole again
    assert index.cached_prefix(keys, NOW + 5) == 2


def test_a_refused_send_takes_back_its_predictions_and_history_but_no_other_requests():
    index = BlockIndex(capacity=100, prediction_ttl_s=3.0)
    index.apply(CacheEvents(cleared=True))
    keys, others = block_keys(PREFIX, BLOCK), block_keys(list(range(100, 132)), BLOCK)
    index.unrouted(index.routed(keys, NOW))  # refused: as if never sent
    assert index.cached_prefix(keys, NOW + 1) == 0 and not index.predicted and not index.history
    index.routed(keys[:4], NOW)  # an earlier request, accepted, holds the first half
    index.unrouted(index.routed(keys, NOW + 1))
    assert index.cached_prefix(keys, NOW + 2) == 4 and set(index.history) == set(keys[:4])
    refused = index.routed(others, NOW)
    index.routed(others, NOW + 1)  # another request with the same blocks, sent there since, and accepted
    index.unrouted(refused)
    assert index.cached_prefix(others, NOW + 2) == 8 and set(others) <= set(index.history)


# --- a replica's start (its epoch) ----------------------------------------------------------------


def test_another_epoch_or_an_unnamed_one_at_a_bring_up_is_a_new_engine_and_the_replica_is_forgotten():
    def info(epoch: str | None) -> ModelInfo:
        return ModelInfo(model="m", max_model_len=2048, vocab_size=100, kv_block_size=BLOCK, kv_cache_blocks=64,
                         kv_events=True, epoch=epoch)

    keys = block_keys(PREFIX, BLOCK)

    def known(made: Replica) -> int:
        return made.index.cached_prefix(keys, NOW)  # by the history (no stream here)

    made = replica(1, live=False)
    made.use(info("a"), came_up=True)
    made.index.routed(keys, NOW)
    made.use(info("a"), came_up=True)  # back after a blip, the same engine
    assert known(made) == 8
    made.use(info("b"))  # another engine (seen in a refresh of its model info)
    assert known(made) == 0 and made.epoch == "b"
    unnamed = replica(2, live=False)
    unnamed.use(info(None), came_up=True)
    unnamed.index.routed(keys, NOW)
    unnamed.use(info(None))  # a replica that names no epoch, refreshed while up: nothing says it restarted
    assert known(unnamed) == 8
    unnamed.use(info(None), came_up=True)  # ... but back from down: it may have
    assert known(unnamed) == 0


# --- the kv policy -----------------------------------------------------------------------------------


def test_kv_sends_a_prompt_to_the_replica_holding_its_prefix():
    a, b, c = replica(1), holding(replica(2), PREFIX), replica(3)
    prompt = Prompt(PREFIX + [7, 7, 7])
    choice = KvAware().choose([a, b, c], prompt, NOW)
    assert choice.replica is b and (choice.blocks, choice.cached) == (8, 8) and choice.reason == "held"
    assert KvAware().choose([a, c], prompt, NOW).reason == "new"
    # the cost, term by term: 3 tokens to prefill there, 35 elsewhere
    assert [kv_cost(r, prompt, KvAware().choose([r], prompt, NOW).cached, Weights()) for r in (a, b)] == [35, 3]


def test_kv_weighs_load_against_prefix():
    weights = Weights(load_weight=10, home_tokens=0)
    busy = holding(replica(1, load=ReplicaLoad(running=3)), PREFIX)  # 0 new tokens + 30
    idle = replica(2)  # 32 new tokens + 0
    assert KvAware(weights).choose([busy, idle], Prompt(PREFIX), NOW).replica is busy
    busy.report(ReplicaLoad(running=4))  # 40 > 32: the prefill elsewhere is cheaper than the queue
    choice = KvAware(weights).choose([busy, idle], Prompt(PREFIX), NOW)
    assert choice.replica is idle and choice.reason == "load"


def test_kv_counts_what_this_worker_sent_since_the_replicas_report_while_it_runs():
    weights = Weights(load_weight=10, home_tokens=0)
    a, b = holding(replica(1, load=ReplicaLoad()), PREFIX), replica(2)
    sent = [a.sent() for _ in range(4)]  # 4 requests running since its last report: 40 > 32
    assert KvAware(weights).choose([a, b], Prompt(PREFIX), NOW).replica is b
    a.ended(sent[0])  # one ended before the engine reported again: no longer load (30 < 32)
    assert KvAware(weights).choose([a, b], Prompt(PREFIX), NOW).replica is a
    a.report(ReplicaLoad(running=3))  # the report counts the three still running
    assert a.sent_since_report == 0 and a.active_requests == 3
    a.ended(sent[1])  # ended after the report: the report's count stands until the next one
    assert a.active_requests == 3


def test_a_report_that_missed_requests_this_worker_has_in_flight_does_not_hide_them():
    """A report taken before the requests this worker just sent reached the replica resets the
    count sent since: the replica still counts at least this worker's own in flight there, so a
    replica that looked idle in its last report does not take every request (seen on CPU: a
    stream of requests all went to one replica, which always looked less busy than it was)."""
    busy, quiet = replica(1, load=ReplicaLoad()), replica(2, load=ReplicaLoad(running=4))
    for _ in range(6):
        busy.sent()
        busy.inflight += 1
    busy.report(ReplicaLoad(running=1))  # taken before five of them arrived
    assert busy.active_requests == 6
    assert KvAware(Weights(home_tokens=0)).choose([busy, quiet], Prompt(list(range(100, 120))), NOW).replica is quiet


# --- the prompt's home ---------------------------------------------------------------------------------


def fleet(ports=(1, 2), **kwargs) -> list[Replica]:
    """One front worker's own view of the same replicas (its own objects, as each worker has)."""
    return [replica(port, **kwargs) for port in ports]


def burst(weights: Weights, workers: int = 4, prefixes: int = 16, per_prefix: int = 4) -> dict[int, set[str]]:
    """Several front workers, each with its own view of two replicas, route a burst of requests
    (each prefix's requests arriving one after another, through different workers) before any
    engine event arrives: the replicas each prefix landed on. Each prompt is a 64-token prefix
    and one token of its own."""
    routers = [(KvAware(weights), fleet()) for _ in range(workers)]
    for offset, (policy, replicas) in enumerate(routers):  # each worker's turn starts elsewhere
        for _ in range(offset):
            policy.in_turn(replicas)
    landed: dict[int, set[str]] = {}
    for request in range(prefixes * per_prefix):
        policy, replicas = routers[request % workers]
        prefix = request // per_prefix
        choice = policy.choose(replicas, Prompt(list(range(1000 * prefix, 1000 * prefix + 64)) + [request]), NOW)
        choice.replica.index.routed(choice.keys, NOW)  # the worker's own prediction
        choice.replica.sent()
        choice.replica.inflight += 1
        landed.setdefault(prefix, set()).add(choice.replica.name)
    return landed


def test_every_worker_sends_a_new_prefix_to_the_same_replica_without_talking_to_the_others():
    """The burst that thrashed the H100's caches: each prefix lands on one replica, whichever
    worker routes it, and the prefixes spread over both."""
    landed = burst(Weights(load_weight=4, home_tokens=32))  # the defaults' ratio (8 requests) at this scale
    assert all(len(names) == 1 for names in landed.values()), landed
    assert len(set().union(*landed.values())) == 2


def test_without_the_home_the_same_burst_scatters_each_prefix():
    """The same burst with the home off (the routing measured on the H100): most prefixes land on
    both replicas, so the test above can tell the two apart."""
    landed = burst(Weights(load_weight=4, home_tokens=0))
    assert sum(len(names) == 2 for names in landed.values()) >= 8, landed


def test_a_prefix_held_on_some_replicas_gathers_on_one_copy_until_that_one_is_busier():
    weights = Weights(load_weight=256, home_tokens=2048)
    prompts = [Prompt(PREFIX + [900 + i]) for i in range(8)]
    a, b = holding(replica(1, load=ReplicaLoad(running=5)), PREFIX), holding(replica(2, load=ReplicaLoad(running=5)), PREFIX)
    c = replica(3, load=ReplicaLoad(running=5))
    policy = KvAware(weights)
    chosen = {policy.choose([a, b, c], prompt, NOW).replica.name for prompt in prompts}
    assert len(chosen) == 1  # equal load, equal cache: always the home, not in turn
    home_replica = a if chosen == {a.name} else b
    other = b if home_replica is a else a
    # its edge is the held part: 32 tokens, so 32 / 256 of one request
    home_replica.report(ReplicaLoad(running=6))
    assert policy.choose([a, b, c], prompts[0], NOW).replica is other


def test_a_start_every_replica_holds_pulls_nowhere():
    """Agents' tool prompts: a long common start held everywhere, then text of each request's own.
    Anchored on the common start, every prompt had one home, which carried about 8 more requests
    than the others for good; anchored on the start plus the request's next block, the prompts
    spread, and the shared start gives no replica an edge."""
    start = list(range(20000, 20000 + 64))
    fleet8 = [holding(replica(port, load=ReplicaLoad(running=4)), start) for port in range(1, 9)]
    policy = KvAware(Weights(load_weight=256, home_tokens=2048))
    counts = dict.fromkeys((r.name for r in fleet8), 0)
    for i in range(800):
        counts[policy.choose(fleet8, Prompt(start + [30000 + i] * 8), NOW).replica.name] += 1
    assert max(counts.values()) < 2 * min(counts.values()), counts


def test_cold_prompts_with_a_long_common_start_spread_by_the_prefill_they_queue():
    """A 3,000-token start of 4k-token documents, held nowhere, from 4 workers at once: the
    requests meet on one home only until the prefill queued there outweighs its edge, so no
    replica takes them all."""
    start = list(range(40000, 40000 + 48))
    workers = [(KvAware(Weights(load_weight=4, home_tokens=32)), [replica(port) for port in range(1, 9)]) for _ in range(4)]
    landed: dict[str, int] = {}
    for i in range(64):
        policy, replicas = workers[i % 4]
        choice = policy.choose(replicas, Prompt(start + list(range(50000 + 100 * i, 50000 + 100 * i + 16))), NOW)
        choice.replica.sent(prefill_tokens=len(start) + 16 - choice.cached * BLOCK)
        choice.replica.inflight += 1
        landed[choice.replica.name] = landed.get(choice.replica.name, 0) + 1
    assert max(landed.values()) <= 16 and len(landed) >= 6, landed


def test_a_new_prefix_goes_home_in_proportion_to_free_cache():
    """A replica whose cache is full of prefixes it holds takes fewer new ones (cache_aware gives a
    new prefix to the replica with the least cached text)."""
    full = replica(1, capacity=100)
    full.index.apply(CacheEvents(stored=list(range(1, 91))))  # 90 of 100 blocks hold prefixes
    empty = replica(2, capacity=100)
    policy = KvAware(Weights(load_weight=256, home_tokens=2048))
    picks = [policy.choose([full, empty], Prompt(list(range(60000 + 40 * i, 60040 + 40 * i))), NOW).replica
             for i in range(200)]
    assert picks.count(empty) >= 150, picks.count(empty)


def test_a_hot_prefix_spills_to_another_replica_once_its_home_is_far_busier():
    """Load in requests against prefill in tokens would keep a 16k-token prefix at home until it
    ran about 62 more requests; the imbalance cut-off hands it on at 32 (and 1.5x)."""
    hot = list(range(70000, 70000 + 16384))
    home_replica = holding(replica(1, capacity=8192, load=ReplicaLoad(running=37)), hot)
    spare = replica(2, capacity=8192, load=ReplicaLoad(running=4))
    policy = KvAware()
    spilled = policy.choose([home_replica, spare], Prompt(hot + [1] * 16), NOW)
    assert spilled.replica is spare and spilled.reason == "guarded"  # the cut-off, not the cost
    home_replica.report(ReplicaLoad(running=30))  # 26 more: at home
    assert policy.choose([home_replica, spare], Prompt(hot + [1] * 16), NOW).replica is home_replica


def test_the_prefill_queued_on_a_replica_counts_in_tokens():
    """Two replicas with the same number of requests, one of them with 30k prompt tokens still to
    prefill: a new prompt goes to the other."""
    queued = replica(1, load=ReplicaLoad(running=2, waiting=2, prefill_tokens=30000))
    idle = replica(2, load=ReplicaLoad(running=4))
    for i in range(16):
        assert KvAware().choose([queued, idle], Prompt(list(range(80000 + 50 * i, 80050 + 50 * i))), NOW).replica is idle


def test_a_replica_holding_more_of_the_prompt_is_its_home_whatever_the_hash():
    """A conversation's next turn stays where its history is: the home is chosen among the
    replicas that hold the most of the prompt."""
    history = list(range(2000, 2064))
    for port in range(1, 9):  # whichever of the pair the hash would favour
        deep = holding(replica(port, load=ReplicaLoad(running=3)), history)
        shallow = holding(replica(port + 10, load=ReplicaLoad(running=3)), history[:16])
        assert KvAware().choose([shallow, deep], Prompt(history + [5, 6, 7, 8]), NOW).replica is deep


def test_prompts_that_share_nothing_spread_by_their_homes_within_the_load_tilt():
    policy, (a, b) = KvAware(Weights(load_weight=256, home_tokens=2048)), fleet()
    picks = [policy.choose([a, b], Prompt(list(range(5000 + 40 * i, 5040 + 40 * i))), NOW).replica.name for i in range(64)]
    assert 16 <= picks.count(a.name) <= 48  # spread by hash, not all on one
    a.report(ReplicaLoad(running=1))  # 40-token prompts: an edge of 40 tokens, less than one request
    assert {policy.choose([a, b], Prompt(list(range(9000 + 40 * i, 9040 + 40 * i))), NOW).replica.name
            for i in range(16)} == {b.name}


def test_the_home_depends_on_the_replicas_names_not_on_their_order():
    prompt = Prompt(list(range(300, 364)))
    first = KvAware().choose(fleet((1, 2, 3)), prompt, NOW).replica.name
    assert all(KvAware().choose(fleet(ports), prompt, NOW).replica.name == first for ports in ((3, 2, 1), (2, 3, 1)))
    assert Prompt(list(range(300, 364)), adapter="sql").anchor(64) != prompt.anchor(64)  # the adapter is in it


def test_a_saturated_replica_is_passed_over_whatever_it_holds():
    full = holding(replica(1, load=ReplicaLoad(kv_usage=0.97)), PREFIX)
    queueing = holding(replica(2, load=ReplicaLoad(waiting=8)), PREFIX)
    free = replica(3, load=ReplicaLoad(running=6))
    choice = KvAware().choose([full, queueing, free], Prompt(PREFIX), NOW)
    assert choice.replica is free and choice.reason == "guarded"


def test_when_every_replica_is_saturated_requests_spread_by_load():
    a = holding(replica(1, load=ReplicaLoad(running=9, waiting=9)), PREFIX)
    b = replica(2, load=ReplicaLoad(running=2, waiting=9))
    choice = KvAware().choose([a, b], Prompt(PREFIX), NOW)
    assert choice.replica is b and choice.reason == "guarded"
    a.report(ReplicaLoad(running=1, waiting=9))  # the one holding the prompt is now the least loaded
    assert KvAware().choose([a, b], Prompt(PREFIX), NOW).reason == "held"


def test_ties_go_to_more_cached_then_fewer_inflight_then_in_turn():
    weights = Weights(load_weight=16, home_tokens=0)
    # equal cost: a holds 4 of 8 blocks with one request (16 new + 16), b holds none and is idle (32 + 0)
    a = replica(1, load=ReplicaLoad(running=1))
    a.index.apply(CacheEvents(stored=block_keys(PREFIX, BLOCK)[:4]))
    b = replica(2)
    assert KvAware(weights).choose([b, a], Prompt(PREFIX), NOW).replica is a
    # the same everything: in turn
    c, d = replica(3), replica(4)
    policy = KvAware(weights)
    picks = [policy.choose([c, d], Prompt(list(range(500 + i, 540 + i))), NOW).replica.name for i in range(4)]
    assert picks == [c.name, d.name, c.name, d.name]
    d.inflight = 1
    assert {policy.choose([c, d], Prompt([1, 2, 3, 4]), NOW).replica.name for _ in range(3)} == {c.name}


def test_a_replica_without_prefix_caching_has_every_token_to_prefill():
    caching, plain = holding(replica(1), PREFIX), replica(2, block_size=None)
    choice = KvAware().choose([plain, caching], Prompt(PREFIX), NOW)
    assert choice.replica is caching
    assert KvAware().choose([plain], Prompt(PREFIX), NOW).cached == 0


# --- round-robin and least-loaded --------------------------------------------------------------------


def test_round_robin_takes_the_replicas_in_turn():
    replicas = [replica(port) for port in (1, 2, 3)]
    policy = RoundRobin()
    names = [policy.choose(replicas, Prompt(PREFIX), NOW).replica.name for _ in range(6)]
    assert names == [r.name for r in replicas] * 2


def test_least_loaded_takes_the_least_active():
    a, b, c = replica(1, load=ReplicaLoad(running=5)), replica(2, load=ReplicaLoad(running=1, waiting=1)), replica(3)
    c.inflight = 3  # no report: this worker's own count
    assert LeastLoaded().choose([a, b, c], Prompt(PREFIX), NOW).replica is b
    b.sent(), b.sent()
    assert LeastLoaded().choose([a, b, c], Prompt(PREFIX), NOW).replica is c


def test_a_policy_is_named():
    assert [make_policy(name).name for name in ("kv", "least-loaded", "round-robin")] == ["kv", "least-loaded", "round-robin"]
    with pytest.raises(ValueError, match="kv, least-loaded or round-robin"):
        make_policy("random")


# --- the fleet's index: one walk for every replica ------------------------------------------------


def test_one_walk_over_the_fleet_finds_what_each_replica_holds_as_its_own_index_does():
    """Replicas sharing a FleetIndex, fed random frames (snapshots, stores, removals, clears,
    pending, degraded, lost streams) and this worker's routings: for any prompt, the fleet's one
    walk plus each replica's own predictions and history gives exactly what walking each
    replica's index alone gives."""
    from services.front.routing.index import FleetIndex
    from services.front.routing.policy import cached_blocks, cached_everywhere

    rng = random.Random(5)
    fleet = FleetIndex()
    chains = [block_keys(list(range(1000 * c, 1000 * c + 64)), BLOCK) for c in range(6)]  # 16 keys each
    fleet_of = [replica(port) for port in range(1, 9)]
    for made in fleet_of:  # one worker's replicas share its fleet index
        made.fleet = fleet
        made._replace_index(made._new_index(made.info))
        made.index.apply(CacheEvents(cleared=True))
    for step in range(600):
        made = rng.choice(fleet_of)
        chain = rng.choice(chains)
        cut = rng.randrange(1, len(chain) + 1)
        action = rng.random()
        if action < 0.05:
            made.index.events_lost()
        elif action < 0.12:
            made.index.apply(CacheEvents(cleared=True, stored=chain[:cut], pending=rng.choice(chains)[:3],
                                         degraded=rng.random() < 0.3))
        elif action < 0.45:
            made.index.apply(CacheEvents(stored=chain[:cut], degraded=made.index.degraded))
        elif action < 0.6:
            made.index.apply(CacheEvents(removed=rng.sample(chain, 3)))
        elif action < 0.7:
            made.index.apply(CacheEvents(pending=chain[:cut]))
        elif action < 0.78:
            made.index.apply(CacheEvents(unpending=chain[:cut]))
        elif action < 0.82:
            made.index.apply(CacheEvents(cleared=True))
        else:
            made.index.routed(chain[:cut], NOW + rng.random())
        if step % 10 == 0:
            tokens = list(range(1000 * chains.index(chain), 1000 * chains.index(chain) + 64)) + [9, 9]
            prompt, now = Prompt(tokens), NOW + rng.random() * 4
            alone = [(r, *cached_blocks(r, prompt, now)) for r in fleet_of]
            assert cached_everywhere(fleet_of, prompt, now) == alone
    owners = 0
    for holders in fleet.holders.values():
        owners |= holders
    reported = {r.index.bit for r in fleet_of if r.index.held or r.index.pending}
    assert all(owners & bit for bit in reported)


def test_a_replaced_index_leaves_the_fleet():
    from services.front.routing.index import FleetIndex

    fleet = FleetIndex()
    a, b = replica(1), replica(2)
    for made in (a, b):
        made.fleet = fleet
        made._replace_index(made._new_index(made.info))
        made.index.apply(CacheEvents(cleared=True, stored=block_keys(PREFIX, BLOCK)))
    gone = a.index.bit
    a.forget("a new engine")
    assert all(not holders & gone for holders in fleet.holders.values())
    assert fleet.leading(block_keys(PREFIX, BLOCK), [b.index.bit]) == {b.index.bit: 8}
