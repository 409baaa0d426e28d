"""Structured outputs and tool calling through the official `openai` client, against the real
pipeline (the session's `pipeline` fixture runs with PIPELINE_ENABLE_AUTO_TOOL_CHOICE=true,
PIPELINE_TOOL_CALL_PARSER=hermes and PIPELINE_CHAT_TEMPLATE=hermes; see tiers.py). Parity with
`vllm serve` is in test_openai_parity.py."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel

MODEL = "smollm2-135m-instruct"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "strict": True,  # the grammar holds the arguments to the schema
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False},
    },
}


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def client(pipeline):
    with openai.OpenAI(base_url=f"{pipeline.url}/v1", api_key="none", timeout=120, max_retries=0) as sync_client:
        yield sync_client


def test_parse_returns_a_parsed_object(client):
    """`client.chat.completions.parse(response_format=PydanticModel)`: the grammar makes the answer
    valid JSON of the schema, and the client parses it."""
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person with a name and an age."}],
        response_format=Person, temperature=0, max_tokens=60,
    )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person), completion
    assert completion.choices[0].finish_reason == "stop"


def test_a_tool_calling_loop_completes(client):
    """Call, run the tool, send the result, get the answer."""
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="required",
                                           temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                            max_tokens=60)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_choice_and_regex_hold(client):
    """The engine applies the grammar: the text is one of the choices, or matches the regex."""
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}], temperature=0.9, seed=3,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}},
    )
    assert response.choices[0].message.content in ("red", "green", "blue")
    completion = client.completions.create(model=MODEL, prompt="A date:", max_tokens=12, temperature=0,
                                           extra_body={"structured_outputs": {"regex": r" \d{4}-\d{2}-\d{2}"}})
    import re

    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", completion.choices[0].text)


def test_generate_takes_structured_outputs(pipeline):
    """/generate (the seed's API) with vLLM's structured_outputs."""
    with httpx.Client(timeout=120) as http:
        response = http.post(f"{pipeline.url}/generate", json={
            "prompt": "Is water wet?", "temperature": 0, "max_tokens": 5,
            "structured_outputs": {"choice": ["yes", "no"]}})
    assert response.status_code == 200, response.text
    assert response.text in ("yes", "no")


@pytest.mark.parametrize(("body", "needle"), [
    ({"messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "invalid type"),
    ({"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "(ab"}}, "regex"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "does not match"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "a", "choice": ["a"]}}, "one"),
])
def test_bad_structured_and_tool_input_is_a_400(pipeline, body, needle):
    """Each refused with 400 and a message that names the problem, never a 500."""
    with httpx.Client(timeout=60) as http:
        response = http.post(f"{pipeline.url}/v1/chat/completions", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    assert needle.lower() in response.json()["error"]["message"].lower(), response.json()
