"""The OpenAI front door through the official `openai` client, sync and async, streamed and not,
against the real pipeline (the session's `pipeline` fixture)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(pipeline):
    with openai.OpenAI(base_url=f"{pipeline.url}/v1", api_key="none", timeout=120, max_retries=0) as sync_client:
        yield sync_client


@pytest.fixture
def async_client(pipeline):
    return openai.AsyncOpenAI(base_url=f"{pipeline.url}/v1", api_key="none", timeout=120, max_retries=0)


def test_models(client):
    """/v1/models lists the served model with its context length."""
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == 2048


def test_chat(client):
    """A greedy chat completion: the known answer, usage and finish reason."""
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.completion_tokens == 8  # 7 text tokens and <|im_end|>, as vLLM counts
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8


def test_chat_stream_with_usage(client):
    """Streamed: a role chunk, content deltas that join to the full answer, a usage chunk."""
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_stop_and_length(client):
    """A stop string ends the text before it; max_tokens ends it with finish_reason 'length'."""
    stopped = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, stop=[" is"], max_tokens=32)
    assert stopped.choices[0].message.content == "The capital of France"
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == " is"
    cut = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


def test_chat_n_and_logprobs(client):
    """n choices, each with logprobs in OpenAI's shape (top_logprobs alternatives, bytes)."""
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, n=2, temperature=0.7, seed=3, max_tokens=6, logprobs=True, top_logprobs=2,
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        content = choice.logprobs.content
        assert len(content) >= 1
        assert "".join(t.token for t in content).startswith(choice.message.content[:3])
        for token in content:
            assert len(token.top_logprobs) == 2 and token.logprob <= 0
            assert bytes(token.bytes).decode() == token.token
    assert response.usage.completion_tokens == sum(len(c.logprobs.content) for c in response.choices)


def test_completion(client):
    """/v1/completions with two prompts and echo: prompt-major choice order, the prompt echoed."""
    response = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=4, temperature=0, echo=True)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text.startswith("The sky is") and response.choices[1].text.startswith("Water is")
    assert response.usage.completion_tokens == 8


def test_completion_stream_and_logprobs(client):
    """Streamed completion with logprobs: tokens join to the text; the usage chunk ends it."""
    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=1, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},  # no <|im_end|> token
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = "".join(t for c in chunks if c.choices for t in c.choices[0].logprobs.tokens)
    assert text and tokens == text
    assert chunks[-1].usage.completion_tokens == 8


def test_refusals_reach_the_client_as_openai_errors(client):
    """Unknown model: NotFoundError (404); unsupported field: BadRequestError (400) naming it."""
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=QUESTION, logit_bias={"1": 5})
    assert refused.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as image:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        )
    assert image.value.body["param"] == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    assert too_long.value.body["param"] == "max_tokens"


def test_async_clients_concurrently(async_client):
    """Async client: plain and streamed requests at once get the same greedy answer."""
    async def plain():
        response = await async_client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
        return response.choices[0].message.content

    async def streamed():
        stream = await async_client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        async with async_client:
            return await asyncio.wait_for(asyncio.gather(plain(), streamed(), plain(), streamed()), timeout=180)

    assert set(asyncio.run(main())) == {"The capital of France is Paris."}


def test_tokenize_round_trip(pipeline):
    """/tokenize then /detokenize at the service root, as vLLM serves them."""
    with httpx.Client(base_url=pipeline.url, timeout=30) as http:
        tokens = http.post("/tokenize", json={"model": MODEL, "prompt": "Héllo 世界 🎉"}).json()
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
        assert text == {"prompt": "Héllo 世界 🎉"}
        chat = http.post("/tokenize", json={"messages": QUESTION, "return_token_strs": True}).json()
        assert chat["token_strs"][-4:] == ["<|im_start|>", "ass", "istant", "Ċ"]  # the generation prompt


def test_openapi_document_lists_every_endpoint(pipeline):
    """The service's OpenAPI document (behind the Swagger UI at /) covers the mounted routes."""
    spec = httpx.get(f"{pipeline.url}/docs.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/generate"):
        assert path in spec["paths"], path
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert "requestBody" in chat and "400" in chat["responses"]


def unfinished_on_engine(pipeline) -> int:
    with pipeline.llm_tier() as llm:
        return llm.post("/load", json={}).json()["unfinished_requests"]


def wait_engine_idle(pipeline, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while (count := unfinished_on_engine(pipeline)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return count


def test_leaving_a_plain_request_aborts_the_engine_request(pipeline):
    """A client that gives up on a non-streamed request stops its generation on the GPU tier
    (router.with_cancellation; dropped streams are covered by test_disconnects_and_metrics.py)."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{pipeline.url}/v1/completions", json=body, timeout=httpx.Timeout(3, connect=5))
    assert wait_engine_idle(pipeline) == 0
