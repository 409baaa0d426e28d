"""A request's life in the front tier, against a stand-in GPU tier (no engine, seconds).

The front here is the real OpenAI app behind the real admission middleware, with the real
`TextGeneration`, `LLMClient` and `TierMonitor`; the GPU tier is `fake_gpu_tier.FakeGpuTier`,
which wears LLMService's own door (internal token, JSON only, engine requests owned by their
call). Each test asserts what a client sees and what the GPU tier saw.
"""

from __future__ import annotations

import asyncio
import errno
import json
import pickle
import time
from pathlib import Path

import httpx
import pytest
from fake_gpu_tier import CONTEXT, TOKEN, VOCAB, Behaviour, FakeGpuTier, Server, served_front, served_gpu_tier, wait_for
from prometheus_client import REGISTRY

from services.config import settings
from services.front.admission import AdmissionMiddleware
from services.front.generation import TextGeneration
from services.front.health import TierMonitor
from services.front.inflight import InflightRequest, SequenceBudget
from services.front.llm_client import LLMClient
from services.front.openai.api_router import app as openai_app
from services.front.openai.serving import OpenAIServing
from services.front.text.templates import ChatFormatter, load_chat_template
from services.front.text.tokenizer import load_tokenizer
from services.protocol import ModelInfo

DEADLINE_S = 4.0
BUDGET, PER_REQUEST, STREAMS = 8, 6, 2


class Front:
    """The front tier's request path, served on loopback, reaching `gpu` with `token`."""

    def __init__(self, gpu_url: str, token: str = TOKEN) -> None:
        self.monitor = TierMonitor("fake", interval_s=0.1, retry_after_s=2)
        self.client = LLMClient(gpu_url, token=token, timeout_s=DEADLINE_S, monitor=self.monitor)
        tokenizer = load_tokenizer(settings.model_path)
        self.generation = TextGeneration(
            tokenizer=tokenizer, formatter=ChatFormatter(tokenizer, load_chat_template("model", tokenizer.chat_template)),
            llm=self.client, context_length=100, vocab_size=int(settings.hf_config["vocab_size"]), default_max_tokens=16,
        )
        openai_app.state.serving = OpenAIServing(self.generation, model_name="fake")
        self.admission = AdmissionMiddleware(
            openai_app, max_body_bytes=1 << 20, budget=SequenceBudget(BUDGET, per_request=PER_REQUEST, retry_after_s=2),
            tier=self.monitor, timeout_s=DEADLINE_S, max_streams_per_request=STREAMS, retry_after_s=2,
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # start and stop the monitor in the server's event loop
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.monitor.watch(self.client.is_ready, on_ready=self._learn)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.monitor.stop()
                    await self.client.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self.admission(scope, receive, send)

    async def _learn(self) -> None:
        self.generation.use_engine(await self.client.model_info())


def aborted(reason: str) -> float:
    return REGISTRY.get_sample_value("pipeline_aborted_requests_total", {"reason": reason}) or 0.0


@pytest.fixture(scope="module")
def gpu():
    with served_gpu_tier(FakeGpuTier()) as fake:
        yield fake


@pytest.fixture(scope="module")
def front(gpu):
    served = Front(gpu.url)
    with served_front(served) as server:
        served.url = server.url
        yield served


@pytest.fixture
def http(front):
    with httpx.Client(base_url=front.url, timeout=15) as client:
        yield client


def completion(prompts, **fields):
    return {"model": "fake", "prompt": prompts, "max_tokens": 5, **fields}


# --- the GPU tier's door -------------------------------------------------------------------------


def test_the_gpu_tier_refuses_callers_without_the_token_and_bodies_that_are_not_json(gpu, tmp_path: Path):
    """No token: 401. A pickle, even with the token: 415, and it is never loaded."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    body = json.dumps({"request": {"request_id": "x", "token_ids": [1], "sampling_params": {"max_tokens": 2}}})
    with httpx.Client(base_url=gpu.url, timeout=5) as client:
        assert client.post("/generate", content=body, headers={"Content-Type": "application/json"}).status_code == 401
        wrong = client.post("/generate", content=body, headers={"Content-Type": "application/json",
                                                                "Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401
        pickled = client.post("/generate", content=pickle.dumps(Exploit()), headers={
            "Content-Type": "application/vnd.bentoml+pickle", "Authorization": f"Bearer {TOKEN}"})
        assert pickled.status_code == 415, pickled.text
        assert "application/json" in pickled.json()["error"]
        assert client.get("/readyz").status_code == 200  # probes need no token
    assert not marker.exists()
    assert "x" not in gpu.started


def test_a_front_with_another_token_keeps_the_gpu_tier_down_and_says_why(gpu):
    async def check() -> TierMonitor:
        monitor = TierMonitor("fake")
        client = LLMClient(gpu.url, token="another-token-0123456789", timeout_s=5, monitor=monitor)
        monitor.watch(client.is_ready, on_ready=lambda: client.model_info())
        await monitor.check_now()
        await monitor.stop()
        await client.close()
        return monitor

    monitor = asyncio.run(check())
    assert not monitor.ready
    assert "PIPELINE_INTERNAL_TOKEN" in monitor.reason


# --- limits from the GPU tier, and its readiness --------------------------------------------------


def test_the_front_takes_the_engines_limits_and_follows_its_readiness(front, gpu, http):
    assert front.generation.context_length == CONTEXT  # 100 until the GPU tier said otherwise
    gpu.ready = False
    try:
        wait_for(lambda: not front.monitor.ready, what="the front marking the GPU tier down")
        refused = http.post("/v1/completions", json=completion([[Behaviour.PACED, 7]]))
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "2"
        assert refused.json()["error"]["code"] == 503
    finally:
        gpu.ready = True
    wait_for(lambda: front.monitor.ready, what="the front marking the GPU tier ready again")
    assert http.post("/v1/completions", json=completion([[Behaviour.PACED, 7]])).status_code == 200


def test_an_eos_the_engine_does_not_know_is_added_to_the_stop_ids(front):
    """The engine has no tokenizer and stops only on generation_config.json's EOS ids: when the
    tokenizer's EOS is not among them, the front asks for it as a stop id (not with ignore_eos)."""
    generation = front.generation
    eos = generation.tokenizer.eos_token_id
    assert generation.sampling_params(3, 5).stop_token_ids == []  # the engine knows it
    generation.use_engine(ModelInfo(model="fake", max_model_len=CONTEXT, vocab_size=VOCAB, eos_token_ids=[]))
    try:
        assert generation.sampling_params(3, 5).stop_token_ids == [eos]
        assert generation.sampling_params(3, 5, stop_token_ids=[9]).stop_token_ids == [9, eos]
        assert generation.sampling_params(3, 5, ignore_eos=True).stop_token_ids == []
    finally:
        generation.use_engine(ModelInfo(model="fake", max_model_len=CONTEXT, vocab_size=VOCAB, eos_token_ids=[eos]))


# --- the request's end: client gone, deadline, GPU tier failing -----------------------------------


def test_a_client_that_leaves_a_stream_aborts_its_engine_request(front, gpu, http):
    before, started = aborted("client_left"), len(gpu.started)
    with http.stream("POST", "/v1/completions", json=completion([[Behaviour.SLOW, 7]], max_tokens=50, stream=True)) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    request_id = gpu.started[started]
    left_at = time.monotonic()
    wait_for(lambda: request_id in gpu.aborted, timeout_s=3, what="the engine request being aborted")
    assert time.monotonic() - left_at < 3  # not when the 50 slow tokens would have ended
    wait_for(lambda: aborted("client_left") == before + 1, what="the client_left abort being counted")


def test_a_client_that_leaves_a_non_streamed_request_aborts_it(front, gpu):
    """Nothing is streamed back, so only the front's watch on the connection can notice; the abort
    must come well before the request's deadline would have ended it."""
    started = len(gpu.started)
    with httpx.Client(base_url=front.url, timeout=httpx.Timeout(1.0)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=completion([[Behaviour.SLOW, 7]], max_tokens=50))
    wait_for(lambda: len(gpu.started) > started and gpu.started[started] in gpu.aborted, timeout_s=DEADLINE_S - 2.5,
             what="the engine request being aborted before the deadline")


def test_the_deadline_ends_the_request_with_504_and_aborts_it(front, gpu, http):
    before, started = aborted("deadline"), len(gpu.started)
    began = time.monotonic()
    response = http.post("/v1/completions", json=completion([[Behaviour.SLOW, 7]], max_tokens=50))
    assert response.status_code == 504, response.text
    assert DEADLINE_S - 0.5 < time.monotonic() - began < DEADLINE_S + 3
    assert "PIPELINE_REQUEST_TIMEOUT_S" in response.json()["error"]["message"]
    wait_for(lambda: gpu.started[started] in gpu.aborted, what="the engine request being aborted")
    assert aborted("deadline") == before + 1


@pytest.mark.parametrize(
    ("behaviour", "status", "message"),
    [(Behaviour.FAIL, 502, "HTTP 500"), (Behaviour.BUSY, 429, "PIPELINE_MAX_ENGINE_REQUESTS"),
     (Behaviour.INVALID, 400, "the engine refused this")],
)
def test_gpu_tier_refusals_map_to_the_clients_status(front, http, behaviour, status, message):
    response = http.post("/v1/completions", json=completion([[behaviour, 7]]))
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    if status == 429:
        assert response.headers["Retry-After"] == "3"  # the GPU tier's own
    assert front.monitor.ready  # a refusal is not an outage


def test_a_gpu_tier_stream_cut_short_is_an_error_not_a_short_answer(front, http):
    before = aborted("gpu_tier")
    full = http.post("/v1/completions", json=completion([[Behaviour.CUT, 7]], max_tokens=10))
    assert full.status_code == 503
    assert "ended before the generation finished" in full.json()["error"]["message"]
    with http.stream("POST", "/v1/completions", json=completion([[Behaviour.CUT, 7]], max_tokens=10, stream=True)) as streamed:
        events = [line[len("data: "):] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "ended before the generation finished" in json.loads(events[-2])["error"]["message"]
    assert aborted("gpu_tier") == before + 2


def test_a_worker_that_has_not_yet_seen_the_tier_ready_checks_before_refusing(gpu):
    """At start-up one front worker may answer /readyz while another's last poll still said not
    ready: that worker checks again before a 503, once for all waiting requests; after the tier
    was seen ready, a down tier is refused at once, with no check."""
    async def scenario():
        monitor = TierMonitor("fake", interval_s=60)
        client = LLMClient(gpu.url, token=TOKEN, timeout_s=5, monitor=monitor)
        checks = 0

        async def counted_check() -> bool:
            nonlocal checks
            checks += 1
            return await client.is_ready()

        monitor._check = counted_check  # as `watch` sets it, without the poll loop
        monitor.reason = "its /readyz does not answer 200"  # a first poll made before the tier was up
        await asyncio.gather(*(monitor.confirm_at_start() for _ in range(5)))
        first = (monitor.ready, checks)
        monitor.mark_down("a call failed")
        await monitor.confirm_at_start()
        await client.close()
        return first, (monitor.ready, checks)

    (ready, checks), (after_outage, checks_after) = asyncio.run(scenario())
    assert (ready, checks) == (True, 1)
    assert (after_outage, checks_after) == (False, 1)


def test_a_worker_out_of_sockets_does_not_mark_the_gpu_tier_down():
    monitor = TierMonitor("fake")
    monitor.ready = True
    client = LLMClient("http://127.0.0.1:9", token=TOKEN, timeout_s=5, monitor=monitor)
    local = client._call_failed(OSError(errno.EMFILE, "Too many open files"))
    assert local.status == 503 and "out of resources" in local.message
    assert monitor.ready
    remote = client._call_failed(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    assert remote.status == 503
    assert not monitor.ready


# --- admission by engine sequences ----------------------------------------------------------------


def test_a_request_over_the_per_request_sequence_cap_is_refused_with_400(http, gpu):
    started = len(gpu.started)
    response = http.post("/v1/completions", json=completion([[Behaviour.PACED, 7]] * 4, n=2))
    assert response.status_code == 400
    assert "PIPELINE_MAX_SEQUENCES_PER_REQUEST" in response.json()["error"]["message"]
    assert len(gpu.started) == started  # refused before any stream opened


def test_sequences_in_flight_are_charged_until_the_last_byte(front, http):
    with http.stream("POST", "/v1/completions",
                     json=completion([[Behaviour.SLOW, 7]] * 3, n=2, max_tokens=2, stream=True)) as holding:
        assert holding.status_code == 200
        refused = http.post("/v1/completions", json=completion([[Behaviour.PACED, 7]] * 3))  # 6 + 3 > 8
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "2"
        assert "PIPELINE_MAX_INFLIGHT_SEQUENCES" in refused.json()["error"]["message"]
        assert http.post("/v1/completions", json=completion([[Behaviour.PACED, 7]] * 2)).status_code == 200  # 6 + 2
        list(holding.iter_lines())
    # given back when the request's call ends, just after the client has read the last byte
    wait_for(lambda: front.admission.budget.in_use == 0, what="the charge being given back")
    assert http.post("/v1/completions", json=completion([[Behaviour.PACED, 7]] * 3)).status_code == 200


def test_one_request_keeps_at_most_its_stream_bound_open(gpu, http):
    gpu.peak_streams = 0
    response = http.post("/v1/completions", json=completion([[Behaviour.PACED, 7 + i] for i in range(6)], max_tokens=5))
    assert response.status_code == 200
    assert len(response.json()["choices"]) == 6
    assert all(choice["finish_reason"] == "length" for choice in response.json()["choices"])
    assert gpu.peak_streams == STREAMS


# --- a response that fails after it started -------------------------------------------------------


def test_a_failure_after_the_response_started_cuts_the_stream():
    """/generate's text stream has no error frame: the client must see a cut stream, not a
    complete one (BentoML's client raises)."""
    from services.errors import RequestError

    async def text_route(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Once upon", "more_body": True})
        InflightRequest.current().break_response(RequestError("the GPU tier went away", status=503))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    app = AdmissionMiddleware(text_route, max_body_bytes=4096, budget=SequenceBudget(4, per_request=4),
                              tier=None, timeout_s=5, max_streams_per_request=1)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=5) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/generate", json={"prompt": "hi"})
        with client.stream("POST", "/generate", json={"prompt": "hi"}) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                list(response.iter_bytes())


# --- the front door's refusals on the OpenAI routes --------------------------------------------


def test_front_door_refusals_on_tokenize_have_the_shape_of_its_400s(front):
    """401 and 413 come from middlewares, before the route: on /tokenize and /detokenize they
    carry OpenAI's error body, like the routes' own 400s."""
    from services.security import BearerAuthMiddleware

    guarded = BearerAuthMiddleware(front.admission, keys=["key-0123456789abcdef"])
    with Server(guarded) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        for path in ("/tokenize", "/detokenize"):
            unauthorized = client.post(path, json={"prompt": "hi"})
            assert unauthorized.status_code == 401
            assert unauthorized.json()["error"]["code"] == 401
        key = {"Authorization": "Bearer key-0123456789abcdef"}
        too_large = client.post("/tokenize", content=b"x" * (2 << 20), headers=key)
        assert too_large.status_code == 413
        assert too_large.json()["error"]["code"] == 413
        bad = client.post("/tokenize", json={"prompt": 5}, headers=key)
        assert bad.status_code == 400
        assert set(bad.json()["error"]) == set(too_large.json()["error"]) == {"message", "type", "param", "code"}
