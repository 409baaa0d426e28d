"""The event plane as a front worker follows it, over stand-in GPU-tier replicas (issue 28): a
stream that goes silent is lost, a new epoch forgets the replica, degraded and pending frames,
the prompt's block keys sent along, predictions taken back when a replica refuses, and LoRA
requests sent only where the adapter is served. Each test asserts what a client sees, what each
replica saw, or the router's own view where only it tells the rule apart."""

from __future__ import annotations

import time

from fake_gpu_tier import Behaviour, wait_for
from test_routing_served import BLOCK, PREFIX, complete, front_over, metric, replicas

from services.kv_blocks import block_keys
from services.protocol import AdapterInfo

KEYS = block_keys([Behaviour.PACED, *PREFIX], BLOCK)  # the prefix's 8 blocks
KV = dict(kv_block_size=BLOCK, kv_events=True, kv_cache_blocks=64)


def believed(front, fake, keys=KEYS) -> int:
    """The leading blocks of `keys` the front believes `fake` holds."""
    return front.replica(fake).index.cached_prefix(keys, time.monotonic())


def live(front, fake) -> bool:
    return front.replica(fake).index.live and metric("pipeline_replica_events_live", fake) == 1


# --- a stream that cannot go stale ------------------------------------------------------------------


def test_a_silent_stream_is_lost_within_the_read_deadline_and_followed_again_once_it_speaks():
    """A hung host or a dropped connection: the stream stays open and sends nothing. Past the
    read deadline the front stops trusting the replica's index and load (the gauge says so),
    routes by its history, and keeps trying; once the replica speaks again, it is live again."""
    with replicas(1, **KV) as fakes, front_over(fakes, events_silence_s=1.0) as front:
        fake, replica = fakes[0], front.replica(fakes[0])
        fake.report_load(running=3)
        wait_for(lambda: live(front, fake) and replica.load is not None, what="the stream live")
        assert complete(front.http, [Behaviour.PACED, *PREFIX, 1]).status_code == 200
        starts = fake.event_stream_starts
        fake.silent = True
        wait_for(lambda: not replica.index.live, timeout_s=3.0, what="the silent stream given up")
        assert metric("pipeline_replica_events_live", fake) == 0 and replica.load is None
        assert believed(front, fake) == 8  # the routing history stands in
        wait_for(lambda: fake.event_stream_starts > starts, what="the stream opened again")
        assert complete(front.http, [Behaviour.PACED, *PREFIX, 2]).status_code == 200
        fake.silent = False
        wait_for(lambda: live(front, fake), timeout_s=15, what="live again")


# --- a replica's start: its epoch -----------------------------------------------------------------------


def test_a_snapshot_of_another_epoch_forgets_what_the_front_knew_of_the_replica():
    """The replica restarts faster than its readiness checks notice: its new stream's snapshot
    names another epoch, and the front's index, predictions and history of it start empty."""
    with replicas(1, **KV) as fakes, front_over(fakes) as front:
        fake = fakes[0]
        wait_for(lambda: live(front, fake), what="the stream live")
        assert complete(front.http, [Behaviour.PACED, *PREFIX, 1]).status_code == 200
        wait_for(lambda: believed(front, fake) == 8, what="the stored blocks")
        assert set(KEYS) <= set(front.replica(fake).index.history)
        fake.restart()
        wait_for(lambda: front.replica(fake).epoch == fake.epoch and live(front, fake), what="the new engine followed")
        index = front.replica(fake).index
        assert not index.history and not index.predicted and not index.held
        assert front.replica(fake).ready  # it never looked down


def bring_up_again(front, fake, *, restart: bool) -> None:
    """The replica goes down and comes back, restarted or not; its event stream is refused from
    then on, so only what the front learns at the bring-up (ModelInfo) can tell a new engine."""
    fake.ready = False
    wait_for(lambda: not front.replica(fake).ready, what="the replica down")
    fake.events_refused = True
    fake.cut_event_streams()
    if restart:
        fake.restart()
    fake.ready = True
    wait_for(lambda: front.replica(fake).ready, what="the replica back")
    wait_for(lambda: not front.replica(fake).index.live, what="its stream lost")


def test_a_replica_back_with_another_epoch_gets_no_request_on_the_strength_of_the_old_cache():
    """Before it is marked ready, the replica's ModelInfo names another epoch: the front forgets
    its history, so a prompt it held before goes where a block of it is held now."""
    with replicas(2, **KV) as fakes, front_over(fakes) as front:
        wait_for(lambda: all(live(front, fake) for fake in fakes), what="both streams")
        assert complete(front.http, [Behaviour.PACED, *PREFIX, 1]).status_code == 200
        restarted, other = fakes if fakes[0].started else fakes[::-1]
        other.store(KEYS[:2])
        wait_for(lambda: believed(front, other) == 2, what="the other's two blocks")
        bring_up_again(front, restarted, restart=True)
        assert believed(front, restarted) == 0
        predicted = metric("pipeline_replica_cached_blocks_predicted_total", restarted)
        before = len(restarted.started)
        for suffix in range(3):
            assert complete(front.http, [Behaviour.PACED, *PREFIX, 10 + suffix]).status_code == 200
        assert len(restarted.started) == before
        assert metric("pipeline_replica_cached_blocks_predicted_total", restarted) == predicted


def test_a_replica_that_names_no_epoch_is_forgotten_when_it_comes_back_and_one_with_the_same_is_not():
    """Without an epoch a bring-up cannot rule out a restart: the history goes. With the same
    epoch it was the same engine all along (a readiness blip): the history stays."""
    with replicas(1, **KV, epoch=None) as unnamed, replicas(1, **KV) as named:
        for fakes, forgotten in ((unnamed, True), (named, False)):
            with front_over(fakes) as front:
                fake = fakes[0]
                wait_for(lambda: live(front, fake), what="the stream live")  # noqa: B023
                assert complete(front.http, [Behaviour.PACED, *PREFIX, 1]).status_code == 200
                bring_up_again(front, fake, restart=False)
                assert believed(front, fake) == (0 if forgotten else 8), fake.epoch


# --- what the replica says of its own index ---------------------------------------------------------


def test_while_a_replicas_index_is_degraded_the_front_adds_its_own_history():
    """The replica's index lost the blocks its engine still holds (a replay gap) and says it is
    degraded: the front keeps sending the prefix there by its history, rather than to a replica
    that reports two blocks of it."""
    with replicas(2, **KV) as fakes, front_over(fakes, prediction_ttl_s=0.1) as front:
        wait_for(lambda: all(live(front, fake) for fake in fakes), what="both streams")
        assert complete(front.http, [Behaviour.PACED, *PREFIX, 1]).status_code == 200
        holder, other = fakes if fakes[0].started else fakes[::-1]
        other.store(KEYS[:2])
        holder.lose_index()
        wait_for(lambda: front.replica(holder).index.degraded and not front.replica(holder).index.held
                 and believed(front, other) == 2, what="the degraded frame")
        before = [len(holder.started), len(other.started)]
        for suffix in range(3):
            assert complete(front.http, [Behaviour.PACED, *PREFIX, 10 + suffix]).status_code == 200
        assert [len(holder.started), len(other.started)] == [before[0] + 3, before[1]]


def test_pending_blocks_count_as_held_and_the_prompts_keys_go_with_the_request():
    """Another front's request on a replica is pending there before its engine stores anything:
    this front counts those blocks as held. And this front sends each prompt's block keys (at the
    replica's block size) to a replica that streams events, which announces them."""
    with replicas(2, **KV) as fakes:
        for fake in fakes:
            fake.store = lambda keys: None  # noqa: B023  (an engine whose events are late)
        with front_over(fakes) as front:
            wait_for(lambda: all(live(front, fake) for fake in fakes), what="both streams")
            fakes[1].announce_pending(KEYS)
            wait_for(lambda: believed(front, fakes[1]) == 8, what="the pending blocks")
            for suffix in range(3):
                assert complete(front.http, [Behaviour.PACED, *PREFIX, suffix]).status_code == 200
            assert [len(fake.started) for fake in fakes] == [0, 3]
            for request_id in fakes[1].started:
                assert fakes[1].block_keys_of[request_id][:8] == KEYS
            fakes[1].end_pending(KEYS)
            wait_for(lambda: believed(front, fakes[1]) == 0, timeout_s=8, what="the pending blocks dropped")


def test_a_replica_without_events_is_sent_no_block_keys():
    with replicas(1, kv_block_size=BLOCK, kv_events=False, kv_cache_blocks=64) as fakes, front_over(fakes) as front:
        assert complete(front.http, [Behaviour.PACED, *PREFIX, 1]).status_code == 200
        assert list(fakes[0].block_keys_of.values()) == [None]


# --- a refused send -----------------------------------------------------------------------------------


def test_a_replica_that_refuses_keeps_no_prediction_or_history_of_the_request():
    """A 429 (the engine at its cap) before the first token: the request goes to the other
    replica, and nothing of it stays believed on the one that refused."""
    with replicas(2, **KV) as fakes, front_over(fakes) as front:
        refusing, taking = fakes
        refusing.refuse_with = 429
        wait_for(lambda: all(live(front, fake) for fake in fakes), what="both streams")
        prompts = []
        for i in range(32):
            prompts.append([Behaviour.PACED, *range(100 * i + 2, 100 * i + 34)])
            assert complete(front.http, prompts[-1]).status_code == 200
            if refusing.received:
                break
        assert refusing.received and len(taking.started) == len(prompts)
        index = front.replica(refusing).index
        for prompt in prompts:
            keys = block_keys(prompt, BLOCK)
            assert not set(keys) & (set(index.history) | set(index.predicted)), prompt[:3]
            assert believed(front, refusing, keys) == 0


# --- LoRA adapters ----------------------------------------------------------------------------------


def adapter(name: str) -> AdapterInfo:
    return AdapterInfo(name=name, path=f"/a/{name}", parent="fake")


def test_a_request_for_an_adapter_goes_only_to_replicas_that_serve_it():
    with replicas(2) as fakes:
        fakes[0].adapters = [adapter("x")]
        with front_over(fakes) as front:
            for i in range(8):
                assert complete(front.http, [Behaviour.PACED, 50 + i], model="x").status_code == 200
            assert len(fakes[0].started) == 8 and not fakes[1].received


def test_a_404_for_an_adapter_unloaded_since_is_retried_on_a_replica_that_serves_it():
    """Both replicas served the adapter when the front last asked; one unloaded it since (through
    another front, or its own API): its 404 is retried once on the other, and the front no longer
    sends it requests for that adapter."""
    with replicas(2) as fakes:
        for fake in fakes:
            fake.adapters = [adapter("x")]
        with front_over(fakes, policy="round-robin") as front:
            fakes[1].adapters = []
            for i in range(4):
                response = complete(front.http, [Behaviour.PACED, 50 + i], model="x")
                assert response.status_code == 200, response.text
            assert len(fakes[1].received) == 1 and not fakes[1].started
            assert fakes[1].received[0] in fakes[0].started and len(fakes[0].started) == 4


def test_an_adapter_no_ready_replica_serves_is_answered_as_a_replica_would():
    with replicas(2) as fakes:
        fakes[0].adapters = [adapter("x")]
        with front_over(fakes) as front:
            fakes[0].ready = False
            wait_for(lambda: not front.replica(fakes[0]).ready, what="the adapter's replica down")
            response = complete(front.http, [Behaviour.PACED, 1], model="x")
            assert response.status_code == 404 and "The model `x` does not exist." in response.text
            assert not fakes[1].received
