"""Each tier started on its own, as the Kubernetes manifests start them (one container per tier):
LLMService alone with the engine, then PromptService alone reaching it through `--depends`.

Order matters: the last test stops and restarts the LLM tier.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import httpx
import pytest

from harness import READY_TIMEOUT_S, Server, start_tier

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def llm_tier(tmp_path_factory: pytest.TempPathFactory):
    tier = start_tier("LLMService", log=tmp_path_factory.mktemp("tiers") / "llm.log")
    try:
        yield tier
    finally:
        tier.stop()


@pytest.fixture(scope="module")
def prompt_tier(llm_tier: Server, tmp_path_factory: pytest.TempPathFactory):
    tier = start_tier("PromptService", log=tmp_path_factory.mktemp("tiers") / "prompt.log",
                      depends={"LLMService": llm_tier.url})
    try:
        yield tier
    finally:
        tier.stop()


def test_llm_tier_alone_runs_only_llmservice_with_the_engine(llm_tier, record_property):
    record_property("llm_ready_after_s", round(llm_tier.ready_after_s, 1))
    assert set(llm_tier.workers()) == {"LLMService"}
    assert llm_tier.engine_processes(), "the LLM tier holds the vLLM engine"
    with llm_tier.llm_tier() as http:
        info = http.post("/model_info", json={})
        assert info.status_code == 200
        assert info.json()["vocab_size"] == 49152
        assert http.get("/livez").status_code == 200


def test_prompt_tier_alone_has_no_engine_and_no_llm_worker(prompt_tier, record_property):
    record_property("prompt_ready_after_s", round(prompt_tier.ready_after_s, 1))
    assert set(prompt_tier.workers()) == {"PromptService"}
    assert prompt_tier.engine_processes() == []


def test_greedy_generate_streams_through_the_separately_started_llm_tier(prompt_tier):
    body = {"prompt": QUESTION, "temperature": 0, "max_tokens": 20}
    with prompt_tier.client() as http, http.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        chunks = [chunk for chunk in response.iter_text() if chunk]
    assert len(chunks) > 1, "the answer streams in several chunks"
    assert "Paris" in "".join(chunks)


# --- the GPU tier's door: only the front tier, only JSON ----------------------------------------


class _CreatesAFile:
    """A pickle that, if anything loaded it, would create `path` (code run in the GPU tier)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_llm_tier_answers_401_to_callers_without_the_internal_token(llm_tier):
    body = {"request": {"request_id": "stranger", "token_ids": [1, 2], "sampling_params": {"max_tokens": 4}}}
    with llm_tier.client(timeout_s=10) as stranger:
        for path in ("/generate", "/abort", "/model_info", "/load"):
            response = stranger.post(path, json=body)
            assert response.status_code == 401, (path, response.text)
            assert "PIPELINE_INTERNAL_TOKEN" in response.json()["error"]
        forged = stranger.post("/generate", json=body, headers={"Authorization": "Bearer not-the-token-at-all"})
        assert forged.status_code == 401
        for open_path in ("/livez", "/readyz", "/metrics"):  # probes and Prometheus need no secret
            assert stranger.get(open_path).status_code == 200, open_path
    with llm_tier.llm_tier() as front:
        assert front.post("/abort", json={"request": {"request_ids": ["x"]}}).status_code == 404  # no abort route


def test_llm_tier_never_loads_a_pickled_body(llm_tier, tmp_path: Path):
    """BentoML unpickles `application/vnd.bentoml+pickle` bodies on any service but the entry one;
    LLMService refuses them before anything reads the body: 401 without the token, 415 with it."""
    marker = tmp_path / "code-ran-in-the-gpu-tier"
    payload = pickle.dumps(_CreatesAFile(marker))
    headers = {"Content-Type": "application/vnd.bentoml+pickle"}
    with llm_tier.client(timeout_s=10) as stranger:
        assert stranger.post("/generate", content=payload, headers=headers).status_code == 401
    with llm_tier.llm_tier() as front:
        refused = front.post("/generate", content=payload, headers=headers)
        assert refused.status_code == 415, refused.text
        assert "application/json" in refused.json()["error"]
        assert front.post("/model_info", content=payload, headers=headers).status_code == 415
    assert not marker.exists(), "the pickle was loaded"


def test_a_prompt_tier_with_another_token_is_not_ready_and_says_why(llm_tier, tmp_path_factory):
    front = start_tier("PromptService", log=tmp_path_factory.mktemp("tiers") / "prompt-wrong-token.log",
                       depends={"LLMService": llm_tier.url}, wait=False,
                       env={"PIPELINE_INTERNAL_TOKEN": "a-different-token-0123456789"})
    try:
        with front.client(timeout_s=10) as http:
            deadline = time.monotonic() + 240
            refusal = None
            while time.monotonic() < deadline:
                try:
                    refusal = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                    if refusal.status_code == 503 and "PIPELINE_INTERNAL_TOKEN" in refusal.text:
                        break
                except httpx.HTTPError:
                    pass  # not up yet
                time.sleep(0.5)
            assert refusal is not None and refusal.status_code == 503, refusal and refusal.text
            assert "PIPELINE_INTERNAL_TOKEN differs between the tiers" in refusal.json()["error"]["message"]
            assert http.get("/readyz").status_code == 503
    finally:
        front.stop()


def test_prompt_tier_follows_the_llm_tier_down_and_back_up(prompt_tier, llm_tier):
    """The front's monitor notices the LLM tier going away and coming back: its /readyz turns
    not ready (so Kubernetes sends no traffic) while /livez stays 200 (so the front is not
    restarted for the back's outage), then ready again once the LLM tier is, with no restart of
    the front."""
    with httpx.Client(base_url=prompt_tier.url, timeout=httpx.Timeout(5, connect=2)) as http:
        assert http.get("/readyz").status_code == 200
        llm_tier.stop()
        went_down = _poll_until(lambda: http.get("/readyz").status_code != 200, prompt_tier, timeout_s=10)
        assert went_down, "the front still says ready 10 s after the LLM tier stopped"
        assert http.get("/livez").status_code == 200
        llm_tier.restart(wait=False)  # same port: the front's --depends URL stays valid
        came_back = _poll_until(lambda: http.get("/readyz").status_code == 200, prompt_tier,
                                timeout_s=READY_TIMEOUT_S, also_alive=llm_tier)
        assert came_back, f"the front did not turn ready again; LLM tier log:\n{llm_tier.log_tail()}"
    with prompt_tier.client() as http:
        response = http.post("/generate", json={"prompt": QUESTION, "temperature": 0, "max_tokens": 4})
    assert response.status_code == 200 and response.text


def _poll_until(check, tier: Server, timeout_s: float, also_alive: Server | None = None) -> bool:
    """Whether `check()` holds within `timeout_s`; False at once if a tier's process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(t.process.poll() is not None for t in (tier, also_alive) if t is not None):
            return False
        try:
            if check():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False

