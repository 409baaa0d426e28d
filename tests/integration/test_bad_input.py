"""Bad input on /generate and the OpenAI routes: always a 4xx that says what is wrong, quickly,
and the server keeps answering normal requests (the session's `pipeline`)."""

from __future__ import annotations

import json

import httpx
import pytest

QUESTION = "What is the capital of France?"
CHAT = [{"role": "user", "content": QUESTION}]
MAX_BODY_BYTES = 1_048_576  # the default PIPELINE_MAX_BODY_BYTES

CASES = [
    # (path, body: a JSON value or raw bytes, words the error must contain)
    ("/generate", b'{"prompt": "unfinished', ["json"]),
    ("/generate", [1, 2, 3], []),
    ("/generate", {"prompt": QUESTION, "max_tokens": "ten"}, ["max_tokens"]),
    ("/generate", {"prompt": QUESTION, "max_tokens": -5}, ["max_tokens"]),
    ("/generate", {"prompt": QUESTION, "top_p": 0}, ["top_p"]),
    ("/generate", {"prompt": QUESTION, "presence_penalty": 7}, ["presence_penalty"]),
    ("/generate", {"prompt": QUESTION, "stop_token_ids": [-1]}, ["stop_token_ids"]),
    ("/generate", {"tokens": [[1, 2]]}, ["tokens"]),
    ("/v1/chat/completions", b"not json at all", []),
    ("/v1/chat/completions", {"model": "smollm2-135m-instruct"}, ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, ["wizard", "user"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 123}]}, ["content"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, ["max_tokens"]),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10**12}, ["max_tokens"]),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 3}, ["temperature"]),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, ["top_p"]),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}, ["n"]),
    ("/v1/chat/completions", {"messages": CHAT, "n": 1000}, ["n"]),
    ("/v1/chat/completions", {"messages": CHAT, "stop_token_ids": [10**9]}, ["stop_token_ids"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 3000}]}, ["2048"]),
    ("/v1/completions", {"prompt": ""}, ["prompt"]),
    ("/v1/completions", {"prompt": [1, 49152]}, ["49152"]),
    ("/v1/completions", {"prompt": QUESTION, "max_tokens": "x"}, ["max_tokens"]),
    ("/v1/completions", {"prompt": QUESTION, "logprobs": 50}, ["logprobs"]),
    ("/v1/completions", {"prompt": QUESTION, "seed": 2**70}, ["seed"]),
]


@pytest.fixture(scope="module")
def http(pipeline):
    with httpx.Client(base_url=pipeline.url, timeout=httpx.Timeout(30, connect=5)) as client:
        yield client


@pytest.mark.parametrize("path, body, words", CASES, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(CASES)])
def test_bad_input_is_a_quick_4xx_that_names_the_problem(http, path, body, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    text = response.text.lower()
    for word in words:
        assert word.lower() in text, (word, response.text[:500])
    assert response.elapsed.total_seconds() < 10


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_an_oversized_body_is_413_with_the_limit(http, path):
    """Refused from its Content-Length, and also when sent chunked (no length given)."""
    big = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()
    response = http.post(path, content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert str(MAX_BODY_BYTES) in response.text

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    response = http.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert str(MAX_BODY_BYTES) in response.text


def test_normal_requests_still_work_after_bad_ones(http):
    response = http.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0, "max_tokens": 16})
    assert response.status_code == 200
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    assert "Paris" in http.post("/generate", json={"prompt": QUESTION, "temperature": 0, "max_tokens": 16}).text
