"""Each tier started on its own, as the Kubernetes manifests start them (one container per tier):
LLMService alone with the engine, then PromptService alone reaching it through `--depends`.

Order matters: the last test stops and restarts the LLM tier.
"""

from __future__ import annotations

import time

import httpx
import pytest

from bench.servers import READY_TIMEOUT_S, Server, start_tier

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
