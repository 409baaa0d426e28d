"""The seed's /generate API through both tiers, with the real engine and the default model."""

from __future__ import annotations

import bentoml
import httpx
import pytest

QUESTION = "What is the capital of France?"


def generate(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/generate", json=body)


def stream_chunks(pipeline, **body) -> list[str]:
    """The text chunks of one streamed /generate, as they arrive."""
    with httpx.Client(base_url=pipeline.url, timeout=httpx.Timeout(60, connect=5)) as http:
        with http.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            return list(response.iter_text())


def test_greedy_answer_mentions_paris(client):
    response = generate(client, prompt=QUESTION, temperature=0, max_tokens=32)
    assert response.status_code == 200
    assert "Paris" in response.text


def test_stream_arrives_in_several_chunks_equal_to_the_whole_answer(pipeline, client):
    body = {"prompt": "Write three sentences about the sea.", "temperature": 0, "max_tokens": 48}
    chunks = stream_chunks(pipeline, **body)
    assert len(chunks) > 5
    assert "".join(chunks) == generate(client, **body).text


def test_seed_client_call_works_as_the_seed_shows(pipeline):
    with bentoml.SyncHTTPClient(pipeline.url, timeout=60, server_ready_timeout=10) as seed_client:
        chunks = list(seed_client.generate(prompt=QUESTION, tokens=None, temperature=0, max_tokens=32))
    assert len(chunks) > 1 and all(isinstance(chunk, str) for chunk in chunks)
    assert "Paris" in "".join(chunks)


def test_prompt_over_the_limit_is_400_naming_both_numbers(client):
    response = generate(client, prompt="word " * 3000, max_tokens=16)
    assert response.status_code == 400
    message = response.text
    assert "2048" in message and "16" in message and "tokens" in message


def test_max_tokens_over_the_limit_is_400(client):
    response = generate(client, prompt=QUESTION, max_tokens=5000)
    assert response.status_code == 400
    assert "5000" in response.text and "2048" in response.text


def test_tokens_input_bypasses_the_template(client, tokenizer):
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    templated_ids = tokenizer.encode(templated, add_special_tokens=False)
    from_prompt = generate(client, prompt=QUESTION, temperature=0, max_tokens=24).text
    # The same ids sent as `tokens` give the same answer: nothing was added to them...
    assert generate(client, tokens=templated_ids, temperature=0, max_tokens=24).text == from_prompt
    # ...and the bare question's ids are continued as plain text, not answered as a chat.
    raw_ids = tokenizer.encode(QUESTION, add_special_tokens=False)
    assert generate(client, tokens=raw_ids, temperature=0, max_tokens=24).text != from_prompt


def test_emoji_and_chinese_decode_without_replacement_characters(client, tokenizer):
    pattern = "🎉 你好世界 🎉 你好世界 🎉 你好世界 🎉 你好世界"
    ids = tokenizer.encode(pattern, add_special_tokens=False)
    response = generate(client, tokens=ids, temperature=0, max_tokens=40)
    assert response.status_code == 200
    text = response.text
    assert "\ufffd" not in text
    assert any(char in text for char in "🎉你好世界")


def test_stop_string_ends_the_output_before_it(client):
    whole = generate(client, prompt=QUESTION, temperature=0, max_tokens=32).text
    assert "Paris" in whole
    stopped = generate(client, prompt=QUESTION, temperature=0, max_tokens=32, stop=["Paris"]).text
    assert stopped == whole[: whole.index("Paris")]


def test_the_two_services_run_as_separate_processes(pipeline):
    workers = pipeline.workers()
    assert set(workers) == {"PromptService", "LLMService"}
    front, gpu = ({worker.pid for worker in workers[name]} for name in ("PromptService", "LLMService"))
    assert front and gpu and not front & gpu
    engine_holders = {
        name for name, processes in workers.items() for worker in processes
        if any("VLLM::" in " ".join(child.cmdline()) or child.name().startswith("VLLM")
               for child in worker.children(recursive=True))
    }
    assert engine_holders == {"LLMService"}


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"prompt": QUESTION, "temperature": -1}, "temperature"),
        ({"prompt": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"tokens": [1, 49152]}, "49152"),
        ({"tokens": []}, "tokens"),
        ({"prompt": 42}, "prompt"),
    ],
)
def test_bad_input_is_a_4xx_that_says_what_is_wrong(client, body, expected):
    response = generate(client, **body)
    assert response.status_code == 400
    assert expected in response.text


def test_a_client_that_leaves_aborts_its_engine_request(pipeline):
    """Dropping a stream half-way frees the engine: no request keeps generating for nobody."""
    body = {"prompt": "Count from one to one thousand.", "max_tokens": 1500, "ignore_eos": True}
    with httpx.Client(base_url=pipeline.url, timeout=httpx.Timeout(60, connect=5)) as http:
        with http.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            next(response.iter_text())  # generation is under way
    load, waited = pipeline.wait_engine_idle(within_s=2)
    assert load == 0, f"{load} engine requests still unfinished {waited:.2f} s after the client left"
