"""Each tier started on its own, as the Kubernetes manifests start them (one container per tier):
LLMService alone with the engine, then PromptService alone reaching it through `--depends`."""

from __future__ import annotations

import httpx
import pytest

from tiers import Tier, start_tier

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def llm_tier(tmp_path_factory: pytest.TempPathFactory):
    tier = start_tier("LLMService", log=tmp_path_factory.mktemp("tiers") / "llm.log")
    try:
        yield tier
    finally:
        tier.stop()


@pytest.fixture(scope="module")
def prompt_tier(llm_tier: Tier, tmp_path_factory: pytest.TempPathFactory):
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
    with llm_tier.client(timeout_s=10) as http:
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


def test_prompt_tier_is_alive_but_not_ready_while_the_llm_tier_is_unreachable(llm_tier, tmp_path_factory):
    """Readiness follows the dependency (so Kubernetes sends no traffic); liveness does not (so the
    front is not restarted for the back's outage)."""
    dead_url = "http://127.0.0.1:9"  # discard port: nothing answers
    tier = start_tier("PromptService", log=tmp_path_factory.mktemp("tiers") / "prompt-dead.log",
                      depends={"LLMService": dead_url}, wait=False)
    try:
        with httpx.Client(base_url=tier.url, timeout=httpx.Timeout(5, connect=2)) as http:
            live = _poll_until(lambda: http.get("/livez").status_code == 200, tier, timeout_s=300)
            assert live, f"PromptService never answered /livez:\n{tier.log_tail()}"
            assert http.get("/readyz").status_code != 200
    finally:
        tier.stop()


def _poll_until(check, tier: Tier, timeout_s: float) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tier.process.poll() is not None:
            return False
        try:
            if check():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False
