"""A front over several stand-in GPU-tier replicas (no engine, seconds): the real OpenAI app,
admission middleware, `TextGeneration`, and services/front/routing/ (replica set, events, index,
policies, router), against `FakeGpuTier`s that serve /kv_events per the contract and can be told
to fail. Each test asserts what a client sees and what each replica saw."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path

import httpx
import pytest
from fake_gpu_tier import TOKEN, Behaviour, FakeGpuTier, Server, served_front, served_gpu_tier, wait_for
from prometheus_client import REGISTRY

from services.config import settings
from services.front.admission import AdmissionMiddleware
from services.front.generation import TextGeneration
from services.front.inflight import SequenceBudget
from services.front.openai.api_router import app as openai_app
from services.front.openai.api_router import attach_lora_routes
from services.front.openai.serving import OpenAIServing
from services.front.routing.discovery import DnsRecords, FixedList, UrlFile, replica_name
from services.front.routing.policy import make_policy
from services.front.routing.replicas import ReplicaSet
from services.front.routing.router import ReplicaRouter
from services.front.text.templates import ChatFormatter, load_chat_template
from services.front.text.tokenizer import load_tokenizer
from services.protocol import AdapterInfo

BLOCK = 4
PREFIX = list(range(1000, 1032))  # 8 blocks of 4


@cache
def tokenizer_and_template():
    tokenizer = load_tokenizer(settings.model_path)
    return tokenizer, load_chat_template("model", tokenizer.chat_template)


class RoutedFront:
    """The front's request path over the replicas `source` names, served on loopback."""

    def __init__(self, source, *, policy: str = "kv", check_interval_s: float = 0.05, refresh_s: float = 0.1,
                 sync_adapters: bool = False, prediction_ttl_s: float = 3.0, events_silence_s: float = 2.0) -> None:
        # the stand-ins send a frame every 0.2 s: a stream silent for 2 s is dead (3.5 s against 1 s in production)
        self.monitor = ReplicaSet(source, token=TOKEN, timeout_s=5, refresh_s=refresh_s,
                                  check_interval_s=check_interval_s, retry_after_s=2, sync_adapters=sync_adapters,
                                  prediction_ttl_s=prediction_ttl_s, events_silence_s=events_silence_s)
        self.router = ReplicaRouter(self.monitor, make_policy(policy))
        tokenizer, template = tokenizer_and_template()
        self.generation = TextGeneration(
            tokenizer=tokenizer, formatter=ChatFormatter(tokenizer, template),
            llm=self.router, context_length=2048, vocab_size=int(settings.hf_config["vocab_size"]), default_max_tokens=16,
        )
        self.serving = OpenAIServing(self.generation, model_name="fake", refresh_models=self._learn)
        self.admission = AdmissionMiddleware(
            openai_app, max_body_bytes=1 << 20, budget=SequenceBudget(64, per_request=16), tier=self.monitor,
            timeout_s=5, max_streams_per_request=4, retry_after_s=2,
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.monitor.start(on_ready=self._learn)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.router.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        openai_app.state.serving = self.serving
        await self.admission(scope, receive, send)

    async def _learn(self) -> None:
        info = await self.router.model_info()
        self.generation.use_engine(info)
        self.serving.use_engine(info)

    def replica(self, fake: FakeGpuTier):
        return next(r for r in self.monitor.replicas.values() if r.url == fake.url)


@contextmanager
def replicas(count: int, **fields):
    with ExitStack() as stack:
        yield [stack.enter_context(served_gpu_tier(FakeGpuTier(**fields))) for _ in range(count)]


@contextmanager
def front_over(fakes, **options):
    front = RoutedFront(FixedList([fake.url for fake in fakes]), **options)
    with served_front(front) as server, httpx.Client(base_url=server.url, timeout=15) as http:
        wait_for(lambda: all(front.monitor.replicas[f.url].ready for f in fakes), what="every replica ready")
        front.http = http
        yield front


def complete(http, tokens: list[int], **fields) -> httpx.Response:
    return http.post("/v1/completions", json={"model": "fake", "prompt": tokens, "max_tokens": 2, **fields})


def metric(name: str, fake: FakeGpuTier) -> float:
    return REGISTRY.get_sample_value(name, {"replica": replica_name(fake.url)}) or 0.0


def served_by(fakes, before: list[int]) -> list[int]:
    return [len(fake.started) - start for fake, start in zip(fakes, before)]


# --- spreading -------------------------------------------------------------------------------------


def test_round_robin_takes_the_replicas_in_turn():
    with replicas(3) as fakes, front_over(fakes, policy="round-robin") as front:
        for i in range(6):
            assert complete(front.http, [Behaviour.PACED, i]).status_code == 200
        assert [len(fake.started) for fake in fakes] == [2, 2, 2]
        assert [metric("pipeline_replica_requests_total", fake) for fake in fakes] == [2, 2, 2]


def test_least_loaded_sends_past_a_replica_busy_with_a_stream():
    with replicas(2) as fakes, front_over(fakes, policy="least-loaded") as front:
        with front.http.stream("POST", "/v1/completions", json={
                "model": "fake", "prompt": [Behaviour.SLOW, 1], "max_tokens": 3, "stream": True}) as holding:
            lines = holding.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            busy = 0 if fakes[0].open_streams else 1
            assert metric("pipeline_replica_inflight", fakes[busy]) == 1
            for i in range(3):
                assert complete(front.http, [Behaviour.PACED, i]).status_code == 200
            assert len(fakes[busy].started) == 1 and len(fakes[1 - busy].started) == 3


def test_kv_spreads_prompts_that_share_nothing():
    """One after another, so no load tells them apart: each goes to its home, a hash of the prompt
    and the replica's name (policy.py), so they spread (3 or fewer of 24 on one side: about 1 in 3,600)."""
    with replicas(2, kv_block_size=BLOCK, kv_events=True, kv_cache_blocks=64) as fakes, front_over(fakes) as front:
        for i in range(24):
            assert complete(front.http, [Behaviour.PACED, *range(100 * i + 2, 100 * i + 20)]).status_code == 200
        assert min(len(fake.started) for fake in fakes) >= 4, [len(fake.started) for fake in fakes]


# --- prefix affinity -------------------------------------------------------------------------------


def test_kv_sends_a_prefix_to_the_replica_whose_engine_reported_it():
    """The second replica's engine holds the prefix (its snapshot says so): every request with that
    prefix goes there, though it is not its turn; the metrics say what the router believed."""
    with replicas(2, kv_block_size=BLOCK, kv_events=True, kv_cache_blocks=64) as fakes:
        from services.kv_blocks import block_keys

        fakes[1].store(block_keys([Behaviour.PACED, *PREFIX], BLOCK))
        with front_over(fakes) as front:
            wait_for(lambda: all(front.replica(f).index.live for f in fakes), what="both event streams")
            predicted = metric("pipeline_replica_cached_blocks_predicted_total", fakes[1])
            held = REGISTRY.get_sample_value("pipeline_routing_decisions_total", {"reason": "held"})
            for suffix in range(5):
                assert complete(front.http, [Behaviour.PACED, *PREFIX, suffix]).status_code == 200
            assert [len(fake.started) for fake in fakes] == [0, 5]
            assert metric("pipeline_replica_cached_blocks_predicted_total", fakes[1]) - predicted == 5 * 8
            # and why: the replica holding the prompt, each time
            assert REGISTRY.get_sample_value("pipeline_routing_decisions_total", {"reason": "held"}) - held == 5
            assert metric("pipeline_replica_prompt_blocks_total", fakes[1]) == 5 * 8


def test_an_eviction_the_engine_reports_moves_the_prefix_back_into_play():
    with replicas(2, kv_block_size=BLOCK, kv_events=True, kv_cache_blocks=64) as fakes, front_over(fakes) as front:
        from services.kv_blocks import block_keys

        keys = block_keys([Behaviour.PACED, *PREFIX], BLOCK)
        fakes[1].store(keys)
        wait_for(lambda: front.replica(fakes[1]).index.cached_prefix(keys, time.monotonic()) == 8, what="the stored event")
        fakes[1].evict(keys)
        fakes[0].store(keys)
        wait_for(lambda: front.replica(fakes[0]).index.cached_prefix(keys, time.monotonic()) == 8
                 and front.replica(fakes[1]).index.cached_prefix(keys, time.monotonic()) == 0, what="the moves")
        for suffix in range(3):
            assert complete(front.http, [Behaviour.PACED, *PREFIX, suffix]).status_code == 200
        assert [len(fake.started) for fake in fakes] == [3, 0]


def test_a_new_prefix_sticks_to_its_first_replica_before_the_engine_confirms_it():
    """The engines here never report what they store: only the router's prediction keeps the
    requests of one new prefix together (without it they would go in turn)."""
    with replicas(2, kv_block_size=BLOCK, kv_events=True, kv_cache_blocks=64) as fakes:
        for fake in fakes:
            fake.store = lambda keys: None  # noqa: B023  (an engine whose events are late)
        with front_over(fakes) as front:
            wait_for(lambda: all(front.replica(f).index.live for f in fakes), what="both event streams")
            for suffix in range(4):
                assert complete(front.http, [Behaviour.PACED, *PREFIX, suffix]).status_code == 200
            assert sorted(len(fake.started) for fake in fakes) == [0, 4]


def test_without_events_the_routing_history_keeps_a_prefix_together():
    with replicas(2, kv_block_size=BLOCK, kv_events=False, kv_cache_blocks=64) as fakes, front_over(fakes) as front:
        for suffix in range(4):
            assert complete(front.http, [Behaviour.PACED, *PREFIX, suffix]).status_code == 200
        assert sorted(len(fake.started) for fake in fakes) == [0, 4]
        assert all(fake.event_stream_starts == 0 for fake in fakes)  # not asked: ModelInfo said no events


def test_while_a_replicas_event_stream_is_down_the_routing_history_stands_in():
    """ModelInfo says events, but the stream is refused: the front keeps asking (with backoff),
    and routes by its own history meanwhile, so a prefix still stays together."""
    with replicas(2, kv_block_size=BLOCK, kv_events=True, kv_cache_blocks=64, events_refused=True) as fakes, \
            front_over(fakes) as front:
        wait_for(lambda: all(fake.event_stream_refusals >= 1 for fake in fakes), what="the streams refused")
        assert not any(front.replica(fake).index.live for fake in fakes)
        for suffix in range(4):
            assert complete(front.http, [Behaviour.PACED, *PREFIX, suffix]).status_code == 200
        assert sorted(len(fake.started) for fake in fakes) == [0, 4]
        wait_for(lambda: all(fake.event_stream_refusals >= 2 for fake in fakes), what="asked again")


def test_the_load_a_replica_reports_is_shared_by_every_front():
    """A replica that reports a full queue (work from other front workers or PromptService
    replicas) takes none of this worker's requests, whatever it holds."""
    with replicas(2, kv_block_size=BLOCK, kv_events=True, kv_cache_blocks=64) as fakes, front_over(fakes) as front:
        from services.kv_blocks import block_keys

        fakes[0].store(block_keys([Behaviour.PACED, *PREFIX], BLOCK))
        fakes[0].report_load(running=4, waiting=9, kv_usage=0.5)
        wait_for(lambda: front.replica(fakes[0]).load is not None, what="the load frame")
        for suffix in range(3):
            assert complete(front.http, [Behaviour.PACED, *PREFIX, suffix]).status_code == 200
        assert [len(fake.started) for fake in fakes] == [0, 3]


def test_an_event_stream_that_ends_is_followed_again_from_a_new_snapshot():
    with replicas(1, kv_block_size=BLOCK, kv_events=True, kv_cache_blocks=64) as fakes, front_over(fakes) as front:
        replica = front.replica(fakes[0])
        wait_for(lambda: replica.index.live, what="the first stream")
        fakes[0].blocks.update({11, 12})  # held, but told only by the next snapshot
        fakes[0].cut_event_streams()
        wait_for(lambda: fakes[0].event_stream_starts == 2 and replica.index.live and {11, 12} <= replica.index.held,
                 what="a second stream with its snapshot")
        assert fakes[0].event_streams == 1


# --- readiness, discovery ---------------------------------------------------------------------------


def test_the_front_is_ready_while_one_replica_is_and_each_is_watched_on_its_own():
    with replicas(2) as fakes, front_over(fakes, policy="round-robin") as front:
        fakes[0].ready = False
        wait_for(lambda: not front.replica(fakes[0]).ready, what="the first replica marked down")
        assert front.monitor.ready
        assert metric("pipeline_replica_ready", fakes[0]) == 0 and metric("pipeline_replica_ready", fakes[1]) == 1
        before = [len(fake.started) for fake in fakes]
        routed = metric("pipeline_replica_requests_total", fakes[0])
        for i in range(4):
            assert complete(front.http, [Behaviour.PACED, i]).status_code == 200
        assert served_by(fakes, before) == [0, 4]
        assert metric("pipeline_replica_requests_total", fakes[0]) == routed  # not even tried there
        fakes[1].ready = False
        wait_for(lambda: not front.monitor.ready, what="the front not ready")
        refused = complete(front.http, [Behaviour.PACED, 1])
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "2"
        assert "no GPU tier replica is available" in refused.json()["error"]["message"]
        fakes[0].ready = True
        wait_for(lambda: front.monitor.ready, what="the first replica back")
        assert complete(front.http, [Behaviour.PACED, 1]).status_code == 200


def replace_file(path: Path, text: str) -> None:
    """Written as a ConfigMap mount or `mv` gives it, whole: a refresh between a truncation and a
    write would read an empty list, which retires every replica (docs/configuration.md)."""
    scratch = path.with_name(path.name + ".new")
    scratch.write_text(text)
    os.replace(scratch, path)


def test_a_file_list_adds_and_retires_replicas_and_bad_input_is_not_ready_with_its_reason(tmp_path: Path):
    listing = tmp_path / "replicas"
    front = RoutedFront(UrlFile(listing), policy="round-robin")
    with replicas(2) as fakes:
        server = Server(front)
        server.server.config.lifespan = "on"
        with server, httpx.Client(base_url=server.url, timeout=15) as http:
            wait_for(lambda: front.monitor.discovery_problem is not None and "cannot be read" in front.monitor.reason,
                     what="a missing file as the reason")
            refused = complete(http, [Behaviour.PACED, 1])
            assert refused.status_code == 503 and "cannot be read" in refused.json()["error"]["message"]
            replace_file(listing, "not a url\n")
            wait_for(lambda: "lists no replica URL" in front.monitor.reason, what="a file of nothing usable")
            replace_file(listing, f"{fakes[0].url}\n")
            wait_for(lambda: front.monitor.ready, what="the first replica from the file")
            replace_file(listing, f"{fakes[0].url}\n{fakes[1].url}\n")  # added: gets traffic
            wait_for(lambda: len(front.monitor.ready_replicas()) == 2, what="the second replica from the file")
            for i in range(4):
                assert complete(http, [Behaviour.PACED, i]).status_code == 200
            assert [len(fake.started) for fake in fakes] == [2, 2]
            replace_file(listing, f"{fakes[1].url}\n")  # the first leaves: no new request after a refresh
            wait_for(lambda: fakes[0].url not in front.monitor.replicas, what="the first replica retired")
            for i in range(3):
                assert complete(http, [Behaviour.PACED, i]).status_code == 200
            assert [len(fake.started) for fake in fakes] == [2, 5]


def test_dns_that_does_not_resolve_is_not_ready_with_its_reason_until_it_does():
    """The headless Service's name through an injected resolver: first unknown, then the
    replicas' address (both stand-ins listen on 127.0.0.1, one port for the DNS source)."""
    import socket

    with replicas(1) as fakes:
        port = int(fakes[0].url.rsplit(":", 1)[1])
        answer: list[str] = []

        async def resolver(name: str, at: int) -> list[str]:
            assert (name, at) == ("llm-headless", port)
            if not answer:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return list(answer)

        front = RoutedFront(DnsRecords("llm-headless", port, resolver=resolver), policy="round-robin")
        server = Server(front)
        server.server.config.lifespan = "on"
        with server, httpx.Client(base_url=server.url, timeout=15) as http:
            wait_for(lambda: "does not resolve" in front.monitor.reason, what="the DNS failure as the reason")
            refused = complete(http, [Behaviour.PACED, 1])
            assert refused.status_code == 503 and "dns://llm-headless" in refused.json()["error"]["message"]
            answer.append("127.0.0.1")
            wait_for(lambda: front.monitor.ready, what="the replica once the name resolves")
            assert complete(http, [Behaviour.PACED, 1]).status_code == 200
            answer.clear()  # the name goes away: so do its replicas, after one refresh
            wait_for(lambda: not front.monitor.ready, what="not ready again")


# --- failures before the first token ---------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429, 500])
def test_a_replica_that_refuses_before_the_first_token_hands_the_request_to_another(status):
    with replicas(2) as fakes, front_over(fakes, policy="round-robin") as front:
        fakes[0].refuse_with = status
        retries = metric("pipeline_replica_retries_total", fakes[0])
        for i in range(4):
            response = complete(front.http, [Behaviour.PACED, i])
            assert response.status_code == 200, response.text
            assert len(response.json()["choices"][0]["text"]) > 0
        assert len(fakes[1].started) == 4
        assert fakes[0].received and set(fakes[0].received) <= set(fakes[1].started)  # the same request ids
        assert metric("pipeline_replica_retries_total", fakes[0]) - retries == len(fakes[0].received)


def test_the_requests_own_fault_is_not_retried():
    with replicas(2) as fakes, front_over(fakes, policy="round-robin") as front:
        fakes[0].refuse_with = 400
        statuses = [complete(front.http, [Behaviour.PACED, i]).status_code for i in range(2)]
        assert sorted(statuses) == [200, 400]
        assert not set(fakes[0].received) & set(fakes[1].received)


def test_a_stream_under_way_that_fails_ends_with_an_error_and_is_not_repeated():
    with replicas(2) as fakes, front_over(fakes, policy="round-robin") as front:
        for i in range(2):
            response = complete(front.http, [Behaviour.CUT, i], max_tokens=10)
            assert response.status_code == 503
            assert "ended before the generation finished" in response.json()["error"]["message"]
        assert [len(fake.received) for fake in fakes] == [1, 1]


def test_a_replica_that_is_gone_is_left_for_another_at_once():
    """Its server stopped: the connection is refused, the request goes to the other replica, and
    the failed call marks it down without waiting for its next check."""
    with replicas(1) as alive, ExitStack() as stack:
        gone = stack.enter_context(served_gpu_tier(FakeGpuTier()))
        with front_over([gone, *alive], policy="round-robin", check_interval_s=60) as front:
            stack.close()  # the replica's server stops; its monitor would not look again for a minute
            for i in range(3):
                assert complete(front.http, [Behaviour.PACED, i]).status_code == 200
            assert len(alive[0].started) == 3
            assert not front.replica(gone).ready


# --- LoRA across replicas -------------------------------------------------------------------------


def test_models_lists_the_union_of_the_replicas_adapters():
    with ExitStack() as stack:
        fakes = [stack.enter_context(served_gpu_tier(FakeGpuTier(adapters=[AdapterInfo(name=name, path=f"/a/{name}",
                                                                                        parent="fake")])))
                 for name in ("x", "y")]
        with front_over(fakes) as front:
            ids = [card["id"] for card in front.http.get("/v1/models").json()["data"]]
            assert ids == ["fake", "x", "y"]


def test_a_lora_load_reaches_every_replica_and_a_late_joiner_gets_it(tmp_path: Path):
    attach_lora_routes()
    listing = tmp_path / "replicas"
    with replicas(3) as fakes:
        replace_file(listing, f"{fakes[0].url}\n{fakes[1].url}\n")
        front = RoutedFront(UrlFile(listing), sync_adapters=True)
        with served_front(front) as server, httpx.Client(base_url=server.url, timeout=15) as http:
            wait_for(lambda: len(front.monitor.ready_replicas()) == 2, what="both replicas")
            loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": "/a/z"})
            assert loaded.status_code == 200, loaded.text
            assert [[a.name for a in fake.adapters] for fake in fakes] == [["z"], ["z"], []]
            replace_file(listing, f"{fakes[0].url}\n{fakes[1].url}\n{fakes[2].url}\n")
            wait_for(lambda: len(front.monitor.ready_replicas()) == 3, what="the third replica")
            assert [a.name for a in fakes[2].adapters] == ["z"]  # given before it was marked ready
            again = http.post("/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": "/a/z"})
            assert again.status_code == 400 and "already loaded" in again.text
            unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "z"})
            assert unloaded.status_code == 200
            assert [fake.adapters for fake in fakes] == [[], [], []]
            # loaded again, then unloaded through another front worker (this one's view is stale):
            # a replica that comes back is given what the others serve now, not what they served
            assert http.post("/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": "/a/w"}).status_code == 200
            replace_file(listing, f"{fakes[0].url}\n{fakes[1].url}\n")
            wait_for(lambda: len(front.monitor.replicas) == 2, what="the third replica gone")
            for fake in fakes:
                fake.adapters = []
            replace_file(listing, f"{fakes[0].url}\n{fakes[1].url}\n{fakes[2].url}\n")
            wait_for(lambda: len(front.monitor.ready_replicas()) == 3, what="the third replica back")
            assert fakes[2].adapters == []
