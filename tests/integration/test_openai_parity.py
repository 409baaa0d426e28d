"""Parity: our OpenAI front door against vLLM's own OpenAI server on the same model folder.

vLLM's server is started once for this module (`python -m vllm.entrypoints.openai.api_server`,
same engine settings as the pipeline: max_model_len 2048, eager, float32 on CPU, both cores, and
the pipeline's tool calling: `--enable-auto-tool-choice --tool-call-parser hermes --chat-template
services/front/text/chat_templates/hermes.jinja`) and stopped in teardown. Each case sends the same
request to both servers, one at a time, and compares
what a client sees: the text of every choice, its finish reason and stop reason, the token counts
(usage), and for logprobs the tokens and their values.

Greedy requests must be identical. Seeded sampling (n > 1 with a seed) is identical as well:
both servers hand the same seed to the same engine, which draws the same numbers.

What cannot be identical, and is therefore not compared:
- `id`, `created` (random and time), and `system_fingerprint` (vLLM stamps its version and
  configuration hash; we send none).
- Logprob values are compared to 1e-4, not bit for bit: both run the same kernels on the same
  prompt, but a sampled position's logprob is computed within the batch the engine happened to
  form, and CPU matmul kernels may sum in a different order for another batch shape.
- How text is cut into stream chunks: both send one chunk per engine step, but our front tier
  holds back text for stop strings and incomplete characters independently of vLLM's
  detokenizer; the concatenated text is what is compared.
"""

from __future__ import annotations

import json

import httpx
import pytest

from harness import ROOT, EngineSettings, free_port, make_server
from services.gpu.engine_args import CPU_DTYPE

MODEL_NAME = "smollm2-135m-instruct"
HERMES_TEMPLATE = ROOT / "services" / "front" / "text" / "chat_templates" / "hermes.jinja"
START_TIMEOUT_S = 300

LONG_TEXT = " ".join(
    [
        "The history of the bicycle spans more than two centuries. Early designs had no pedals and were",
        "pushed along by the rider's feet. Pedals attached to the front wheel came later, and the",
        "high-wheeler followed, with its huge front wheel that made every ride a balancing act. The",
        "safety bicycle, with two wheels of equal size and a chain driving the rear one, changed",
        "everything: it was stable, fast and affordable, and it gave millions of people a new freedom",
        "to travel.",
    ]
    * 8
)

CHAT_CASES = {
    "short": {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 48},
    "system prompt": {
        "messages": [
            {"role": "system", "content": "You are a pirate. Answer in one short sentence."},
            {"role": "user", "content": "Where is the treasure?"},
        ],
        "max_tokens": 48,
    },
    "several turns": {
        "messages": [
            {"role": "user", "content": "My name is Ada. Remember it."},
            {"role": "assistant", "content": "Nice to meet you, Ada! I will remember your name."},
            {"role": "user", "content": "What is my name?"},
        ],
        "max_tokens": 32,
    },
    "unicode and emoji": {
        "messages": [{"role": "user", "content": "Répète exactement: « Ça va très bien 😀 🍕 ☕ — 世界 »"}],
        "max_tokens": 48,
    },
    "text parts": {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One word."}]}],
        "max_tokens": 16,
    },
    "long prompt": {
        "messages": [{"role": "user", "content": f"Summarize in one sentence:\n\n{LONG_TEXT}"}],
        "max_tokens": 40,
    },
    "stop strings": {
        "messages": [{"role": "user", "content": "Count from one to ten in words, separated by commas."}],
        "stop": [",", "six"],
        "max_tokens": 48,
    },
    "stop string inside the answer": {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "stop": [" is"],
        "max_tokens": 32,
    },
    "stop string kept": {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "stop": "Paris",
        "include_stop_str_in_output": True,
        "max_tokens": 48,
    },
    "max_tokens cut-off": {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}], "max_completion_tokens": 7},
    "n=2 with a seed": {
        "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
        "n": 2,
        "seed": 1234,
        "temperature": 0.8,
        "max_tokens": 24,
    },
    "logprobs": {
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "logprobs": True,
        "top_logprobs": 3,
        "max_tokens": 12,
    },
    "streamed with usage": {
        "messages": [{"role": "user", "content": "Say hello in three languages."}],
        "max_tokens": 40,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}

COMPLETION_CASES = {
    "short": {"prompt": "The capital of France is"},
    "unicode": {"prompt": "Le café ☕ et les croissants 🥐 sont", "max_tokens": 24},
    "stop string": {"prompt": "1, 2, 3, 4,", "stop": [" 7"], "max_tokens": 32},
    "stop string after min_tokens": {"prompt": "1, 2, 3, 4,", "stop": [","], "min_tokens": 4, "max_tokens": 32},
    "length": {"prompt": "Once upon a time", "max_tokens": 5},
    "token ids": {"prompt": [504, 3575, 282, 4649, 314], "max_tokens": 10},
    "two prompts and echo": {"prompt": ["The sky is", "Water boils at"], "echo": True, "max_tokens": 12},
    "logprobs": {"prompt": "The first three planets are", "logprobs": 2, "max_tokens": 10},
    "n=3 with a seed": {"prompt": "My favourite animal is", "n": 3, "seed": 7, "temperature": 1.0, "max_tokens": 12},
    "streamed with usage": {
        "prompt": "The best way to learn a language is",
        "max_tokens": 30,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        # strict: vLLM's grammar for required / named choice holds the arguments to this schema
        # (without it only the call's envelope is constrained, and a small model rambles on)
        "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"], "additionalProperties": False},
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "The local time in a city", "strict": True,
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                                "additionalProperties": False}},
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

STRUCTURED_CASES = {
    "json_object": {"messages": [{"role": "user", "content": "Describe a cat as a JSON object."}],
                    "response_format": {"type": "json_object"}, "max_tokens": 40},
    "strict json_schema": {
        "messages": [{"role": "user", "content": "Invent a person with a name and an age."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}},
        "max_tokens": 60,
    },
    "choice": {"messages": [{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
               "structured_outputs": {"choice": ["yes", "no"]}},
    "regex": {"messages": [{"role": "user", "content": "Give me a phone number."}],
              "structured_outputs": {"regex": r"\d{3}-\d{3}-\d{4}"}},
    "json_schema streamed": {
        "messages": [{"role": "user", "content": "Invent a person with a name and an age."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
        "max_tokens": 60, "stream": True, "stream_options": {"include_usage": True},
    },
    "tool_choice required": {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "required",
                             "max_tokens": 80},
    "tool_choice named": {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL, TIME_TOOL],
                          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 80},
    "tool_choice auto": {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "max_tokens": 80},
    "tool_choice none with tools": {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "tool_choice": "none",
                                    "max_tokens": 40},
    "a tool call and its result": {
        "messages": [
            *WEATHER_QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "unit": "celsius", "sky": "sunny"}'},
        ],
        "tools": [WEATHER_TOOL],
        "max_tokens": 60,
    },
    "required streamed": {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "required",
                          "max_tokens": 80, "stream": True, "stream_options": {"include_usage": True}},
    "named streamed": {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL, TIME_TOOL],
                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 80,
                       "stream": True, "stream_options": {"include_usage": True}},
}

STRUCTURED_COMPLETION_CASES = {
    "regex": {"prompt": "My phone number is", "structured_outputs": {"regex": r" \d{3}-\d{4}"}, "max_tokens": 12},
    "json_schema": {"prompt": "A person as JSON:", "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}},
                    "max_tokens": 40},
}

ERROR_CASES = {
    "unknown model": ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    "max_tokens over the context": ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}),
    "prompt over the context": ("/v1/completions", {"prompt": LONG_TEXT * 4, "max_tokens": 5}),
    "top_logprobs without logprobs": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    ),
    "a schema that is not JSON Schema": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
    ),
    "a regex that does not compile": (
        "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "(ab"}},
    ),
    "a grammar that does not parse": (
        "/v1/completions", {"prompt": "hi", "structured_outputs": {"grammar": "root ::= ("}},
    ),
    "tool_choice naming an unknown function": (
        "/v1/chat/completions",
        {"messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    ),
}


def model_folder() -> str:
    import bentoml

    return bentoml.models.get(f"{MODEL_NAME}:latest").path


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory):
    """vLLM's own OpenAI server on the same model folder, for this module only."""
    settings = EngineSettings(model=model_folder(), served_name=MODEL_NAME, max_model_len=2048, dtype=CPU_DTYPE,
                              enforce_eager=True, cpu=True, cpu_kvcache_gib=1)
    tools = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--chat-template", str(HERMES_TEMPLATE)]
    server = make_server("vllm", settings, free_port(), tmp_path_factory.mktemp("vllm"), vllm_args=tools)
    server.start_and_wait(START_TIMEOUT_S)
    try:
        yield server.url
    finally:
        server.stop()


def call(url: str, path: str, body: dict) -> tuple[int, dict]:
    """POST and return (status, body); a streamed answer is folded into the shape of a full one."""
    with httpx.Client(timeout=httpx.Timeout(180, connect=5)) as http:
        if not body.get("stream"):
            response = http.post(url + path, json={"model": MODEL_NAME, **body})
            return response.status_code, response.json()
        with http.stream("POST", url + path, json={"model": MODEL_NAME, **body}) as response:
            assert response.status_code == 200, response.read()
            return 200, fold_stream(response.iter_lines())


def fold_stream(lines) -> dict:
    """Join SSE chunks: text per choice, the last finish/stop reason, the usage chunk."""
    choices: dict[int, dict] = {}
    usage, done = None, False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            folded = choices.setdefault(choice["index"], {"index": choice["index"], "text": "", "finish_reason": None,
                                                          "stop_reason": None, "tool_calls": {}})
            folded["text"] += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            for call in (choice.get("delta") or {}).get("tool_calls") or []:  # reassembled from their deltas
                whole = folded["tool_calls"].setdefault(call["index"], {"name": "", "arguments": ""})
                function = call.get("function") or {}
                whole["name"] += function.get("name") or ""
                whole["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason") is not None:
                folded["finish_reason"] = choice["finish_reason"]
                folded["stop_reason"] = choice.get("stop_reason")
    assert done, "the stream did not end with [DONE]"
    for folded in choices.values():
        folded["tool_calls"] = [folded["tool_calls"][i] for i in sorted(folded["tool_calls"])]
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def summary(body: dict) -> dict:
    """What must be identical: per choice text, finish and stop reason; the token counts."""
    choices = []
    for choice in body["choices"]:
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        calls = choice.get("tool_calls") if "tool_calls" in choice else (choice.get("message") or {}).get("tool_calls")
        # tool calls: name and parsed arguments (ids are random)
        calls = [(c.get("function", c)["name"], json.loads(c.get("function", c)["arguments"] or "null")) for c in calls or []]
        choices.append((choice["index"], text or "", calls, choice["finish_reason"], choice.get("stop_reason")))
    usage = body["usage"]
    return {"choices": choices, "usage": (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])}


def assert_logprobs_match(ours: dict, theirs: dict) -> None:
    for mine, ref in zip(ours["choices"], theirs["choices"], strict=True):
        a, b = mine["logprobs"], ref["logprobs"]
        if "content" in b:  # chat shape
            assert [t["token"] for t in a["content"]] == [t["token"] for t in b["content"]]
            for x, y in zip(a["content"], b["content"]):
                assert x["bytes"] == y["bytes"]
                assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
                assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
                assert [t["logprob"] for t in x["top_logprobs"]] == pytest.approx([t["logprob"] for t in y["top_logprobs"]], abs=1e-4)
        else:  # completions shape
            assert a["tokens"] == b["tokens"]
            assert a["text_offset"] == b["text_offset"]
            assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)
            for x, y in zip(a["top_logprobs"], b["top_logprobs"]):
                assert list(x) == list(y)
                assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)


def same_answer(url: str, vllm_url: str, path: str, body: dict) -> tuple[dict, dict]:
    """Both servers' 200 answers to `body`, asserted to read the same (summary)."""
    status, ours = call(url, path, body)
    ref_status, theirs = call(vllm_url, path, body)
    assert (status, ref_status) == (200, 200), (ours, theirs)
    assert summary(ours) == summary(theirs)
    return ours, theirs


@pytest.mark.parametrize("case", CHAT_CASES)
def test_chat_parity(case: str, pipeline, vllm_url: str):
    """Chat completions: same text, finish and stop reasons, token counts (and logprobs)."""
    body = {"temperature": 0, **CHAT_CASES[case]}
    ours, theirs = same_answer(pipeline.url, vllm_url, "/v1/chat/completions", body)
    if body.get("logprobs"):
        assert_logprobs_match(ours, theirs)


@pytest.mark.parametrize("case", COMPLETION_CASES)
def test_completion_parity(case: str, pipeline, vllm_url: str):
    """Completions: same text, finish and stop reasons, token counts (and logprobs)."""
    body = {"temperature": 0, **COMPLETION_CASES[case]}
    ours, theirs = same_answer(pipeline.url, vllm_url, "/v1/completions", body)
    if body.get("logprobs") is not None:
        assert_logprobs_match(ours, theirs)


@pytest.mark.parametrize("case", STRUCTURED_CASES)
def test_structured_and_tool_parity(case: str, pipeline, vllm_url: str):
    """Structured outputs and tool calling: same content, tool calls (name and parsed arguments),
    finish reason and token counts as `vllm serve --enable-auto-tool-choice --tool-call-parser hermes`."""
    body = {"temperature": 0, **STRUCTURED_CASES[case]}
    ours, theirs = same_answer(pipeline.url, vllm_url, "/v1/chat/completions", body)
    if "tool_choice" in body and body["tool_choice"] not in ("auto", "none"):
        assert summary(ours)["choices"][0][2], "a tool call was forced"


@pytest.mark.parametrize("case", STRUCTURED_COMPLETION_CASES)
def test_structured_completion_parity(case: str, pipeline, vllm_url: str):
    body = {"temperature": 0, **STRUCTURED_COMPLETION_CASES[case]}
    same_answer(pipeline.url, vllm_url, "/v1/completions", body)


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_parity(case: str, pipeline, vllm_url: str):
    """Refusals: same status, error type and param."""
    path, body = ERROR_CASES[case]
    status, ours = call(pipeline.url, path, body)
    ref_status, theirs = call(vllm_url, path, body)
    assert status == ref_status
    assert {k: ours["error"][k] for k in ("type", "param", "code")} == {k: theirs["error"][k] for k in ("type", "param", "code")}


def test_tokenize_parity(pipeline, vllm_url: str):
    """/tokenize and /detokenize: same ids, strings, counts and text, for a prompt and a chat."""
    requests = [
        ("/tokenize", {"prompt": "Héllo 世界 🎉 done", "return_token_strs": True}),
        ("/tokenize", {"messages": CHAT_CASES["several turns"]["messages"], "return_token_strs": True}),
        ("/tokenize", {"messages": CHAT_CASES["system prompt"]["messages"], "add_generation_prompt": False}),
        ("/detokenize", {"tokens": [504, 3575, 282, 4649, 314, 7042, 30, 2]}),
    ]
    for path, body in requests:
        status, ours = call(pipeline.url, path, body)
        ref_status, theirs = call(vllm_url, path, body)
        assert (status, ref_status) == (200, 200)
        assert ours == theirs, path


def test_models_parity(pipeline, vllm_url: str):
    """/v1/models lists the same model id and context length."""
    with httpx.Client(timeout=10) as http:
        ours = http.get(pipeline.url + "/v1/models").json()
        theirs = http.get(vllm_url + "/v1/models").json()
    pick = lambda body: [(m["id"], m["object"], m["owned_by"], m["max_model_len"]) for m in body["data"]]  # noqa: E731
    assert pick(ours) == pick(theirs)
