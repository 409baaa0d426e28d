"""The OpenAI front door through the official `openai` client, sync and async, streamed and not,
against the real pipeline (the session's `pipeline` fixture).

What the model says is not asserted here (test_openai_parity.py compares it with vLLM's own
server); these tests check what holds for any model: the shapes, that the ways of asking for one
greedy answer agree with each other, the token counts, stops and cut-offs.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from bench.server_metrics import samples
from harness import poll

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


@pytest.fixture(scope="module")
def greedy(client):
    """The greedy answer to QUESTION (at most 32 tokens), which the other ways of asking must match."""
    return client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)


def test_chat(greedy, pipeline):
    """A greedy chat completion: its shape, and usage that counts the templated prompt."""
    choice = greedy.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert greedy.object == "chat.completion" and greedy.id.startswith("chatcmpl-")
    with httpx.Client(base_url=pipeline.url, timeout=30) as http:
        prompt = http.post("/tokenize", json={"model": MODEL, "messages": QUESTION}).json()
    assert greedy.usage.prompt_tokens == prompt["count"]
    assert 1 <= greedy.usage.completion_tokens <= 32
    assert greedy.usage.total_tokens == greedy.usage.prompt_tokens + greedy.usage.completion_tokens


def test_chat_stream_with_usage(client, greedy):
    """Streamed: a role chunk, content deltas that join to the same answer, a usage chunk with
    the same counts."""
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == greedy.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        greedy.usage.prompt_tokens, greedy.usage.completion_tokens, greedy.usage.total_tokens)


def test_chat_stop_and_length(client, greedy):
    """A stop string (a word of the greedy answer) ends the text before it; max_tokens ends it
    with finish_reason 'length'."""
    whole = greedy.choices[0].message.content
    words = whole.split()
    assert len(words) >= 2, whole
    stop = " " + words[1]
    stopped = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, stop=[stop], max_tokens=32)
    assert stopped.choices[0].message.content == whole[: whole.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == stop
    cut = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=3,
                                         extra_body={"ignore_eos": True})
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
    response = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=4, temperature=0, echo=True,
                                         extra_body={"ignore_eos": True})
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
    """Async client: plain and streamed requests at once each get a whole greedy answer, its
    finish reason and its token count.

    Not compared with each other: greedy decoding is not batch-invariant (in bf16 on a CPU the
    kernels sum in another order for another batch shape), and where two tokens are close the
    four answers of one batch were seen to part ways."""
    async def plain():
        response = await async_client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
        return response.choices[0].message.content, response.choices[0].finish_reason, response.usage.completion_tokens

    async def streamed():
        stream = await async_client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return text, finish, chunks[-1].usage.completion_tokens

    async def main():
        async with async_client:
            return await asyncio.wait_for(asyncio.gather(plain(), streamed(), plain(), streamed()), timeout=180)

    for text, finish, tokens in asyncio.run(main()):
        assert text and finish in ("stop", "length") and 1 <= tokens <= 32, (text, finish, tokens)
        assert finish != "length" or tokens == 32, (text, finish, tokens)


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


def counts(pipeline) -> tuple[float, float, float]:
    """Generations the front tier stopped because their client left, tokens the engine made, and
    engine requests LLMService aborted because the call that started them ended."""
    with httpx.Client(base_url=pipeline.url, timeout=10) as front, pipeline.llm_tier() as llm:
        left = samples(front.get("/metrics").text).get('pipeline_aborted_requests_total{reason="client_left"}', 0.0)
        gpu = samples(llm.get("/metrics").text)
        made = sum(v for k, v in gpu.items() if k.split("{")[0] == "vllm:generation_tokens_total")
        aborted = sum(v for k, v in gpu.items() if k.split("{")[0] == "pipeline_engine_aborted_requests_total")
    return left, made, aborted


def test_leaving_a_plain_request_aborts_the_engine_request(pipeline):
    """A client that gives up on a non-streamed request stops its generation on the GPU tier
    (the admission middleware watches the connection; dropped streams are covered by
    test_disconnects_and_metrics.py).

    The client leaves as soon as the engine holds its request. Proof that the generation was
    stopped rather than left to finish, on a machine of any speed: the front counts one more
    client that left, the engine is idle again within seconds, and it made fewer tokens than
    the request's max_tokens (it makes exactly that many when it runs to the end)."""
    max_tokens = 1500
    before = counts(pipeline)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", pipeline.port), timeout=10) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        assert poll(pipeline.engine_load, lambda load: load == 1, within_s=30) == 1, "the engine never got it"
    load, waited = pipeline.wait_engine_idle(within_s=10)
    assert load == 0, f"the engine still holds {load} requests {waited:.1f} s after the client left"
    after = poll(lambda: counts(pipeline), lambda now: now[0] > before[0], within_s=10)
    assert after[0] - before[0] == 1, (before, after)
    assert after[1] - before[1] < max_tokens, f"the engine made all {max_tokens} tokens: the request was not aborted"
    assert after[2] - before[2] == 1, "LLMService aborted the engine request of the closed call"
