"""OpenAI request validation: what is accepted, what is refused, and the error body it gets.

No server and no engine: the models are validated directly, and the router's error handling is
exercised in-process with Starlette's TestClient (validation fails before any handler runs).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from services.front.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    TokenizeChatRequest,
)
from services.front.openai.api_router import app

USER = [{"role": "user", "content": "hi"}]


def refusal(model, body: dict) -> ProtocolError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    cause = caught.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, ProtocolError)
    return cause


def test_chat_defaults_are_vllms():
    """An empty-handed request gets vLLM's defaults."""
    request = ChatCompletionRequest.model_validate({"messages": USER})
    assert request.sampling_fields() == {
        "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
        "stop_token_ids": [], "min_tokens": 0, "ignore_eos": False,
    }
    assert request.requested_max_tokens() == (None, "max_tokens")
    assert request.add_generation_prompt and not request.continue_final_message and not request.add_special_tokens


def test_max_completion_tokens_wins_over_max_tokens():
    request = ChatCompletionRequest.model_validate({"messages": USER, "max_tokens": 5, "max_completion_tokens": 9})
    assert request.requested_max_tokens() == (9, "max_completion_tokens")


def test_text_parts_are_joined_with_newlines():
    """A list of text parts reaches the template as one string (vLLM's "string" content format)."""
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert request.messages[0].for_template() == {"role": "user", "content": "a\nb"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("logit_bias", {"1": 5}),
        ("functions", [{"name": "f"}]),
        ("audio", {"voice": "alloy"}),
        ("modalities", ["text", "audio"]),
        ("use_beam_search", True),
        ("prompt_logprobs", 1),
        ("chat_template", "{{ messages }}"),
    ],
)
def test_unsupported_chat_fields_are_refused_by_name(field, value):
    """Fields we do not implement are refused with their name, never ignored."""
    error = refusal(ChatCompletionRequest, {"messages": USER, field: value})
    assert error.param == field
    assert f"`{field}`" in error.message


@pytest.mark.parametrize(("field", "value"), [("tool_choice", "none"), ("response_format", {"type": "text"}), ("logit_bias", {})])
def test_unused_values_of_unsupported_fields_pass(field, value):
    """Values that ask for nothing (tool_choice "none", text output) are accepted."""
    ChatCompletionRequest.model_validate({"messages": USER, field: value})


def test_unknown_fields_are_refused():
    error = refusal(ChatCompletionRequest, {"messages": USER, "temprature": 0})
    assert error.param == "temprature"


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "image_url"),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "input_audio"),
        ({"type": "file", "file": {"file_id": "x"}}, "file"),
    ],
)
def test_non_text_content_parts_are_refused(part, kind):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]}
    error = refusal(ChatCompletionRequest, body)
    assert error.param == "messages[0].content[1]"
    assert kind in error.message


def test_deprecated_function_messages_are_refused():
    error = refusal(ChatCompletionRequest, {"messages": [*USER, {"role": "function", "content": "42", "name": "f"}]})
    assert error.param == "messages[1].role"


def test_a_tool_message_needs_its_tool_call_id():
    error = refusal(ChatCompletionRequest, {"messages": [*USER, {"role": "tool", "content": "42"}]})
    assert error.param == "messages[1].tool_call_id"
    assert "tool_call_id" in error.message


def test_tool_calls_and_results_reach_the_template_as_vllm_hands_them():
    """Arguments become a dict (vLLM's _postprocess_messages; not a JSON object: {}), the result
    keeps its tool_call_id."""
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
             {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]
    request = ChatCompletionRequest.model_validate({"messages": [
        *USER, {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "42", "tool_call_id": "1"}]})
    assistant, tool = (m.for_template() for m in request.messages[1:])
    assert assistant == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
        {"id": "2", "type": "function", "function": {"name": "g", "arguments": {}}}]}
    assert tool == {"role": "tool", "content": "42", "tool_call_id": "1"}
    assert refusal(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x", "tool_calls": calls}]}).param \
        == "messages[0].tool_calls"


def test_vllm_consistency_checks():
    """vLLM's own cross-field checks, with the same parameter names."""
    assert refusal(ChatCompletionRequest, {"messages": USER, "top_logprobs": 2}).param == "top_logprobs"
    assert refusal(ChatCompletionRequest, {"messages": USER, "stream_options": {"include_usage": True}}).param == "stream_options"
    assert refusal(ChatCompletionRequest, {"messages": USER, "continue_final_message": True}).param == "continue_final_message"
    ChatCompletionRequest.model_validate({"messages": USER, "continue_final_message": True, "add_generation_prompt": False})
    ChatCompletionRequest.model_validate({"messages": USER, "logprobs": True, "top_logprobs": None})
    assert refusal(TokenizeChatRequest, {"messages": USER, "continue_final_message": True}).param == "continue_final_message"


def test_too_many_stop_strings():
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": USER, "stop": ["a", "b", "c", "d", "e"]})


def test_completion_prompts():
    """Every prompt shape of the completions API, and vLLM's max_tokens default of 16 (also for null)."""
    assert CompletionRequest.model_validate({"prompt": "hi"}).prompts() == ["hi"]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompts() == [[1, 2, 3]]
    assert CompletionRequest.model_validate({"prompt": [[1, 2], [3]]}).prompts() == [[1, 2], [3]]
    assert CompletionRequest.model_validate({"prompt": "hi"}).max_tokens == 16
    assert CompletionRequest.model_validate({"prompt": "hi", "max_tokens": None}).max_tokens == 16


@pytest.mark.parametrize("prompt", [None, "", []])
def test_completion_needs_a_prompt(prompt):
    assert refusal(CompletionRequest, {"prompt": prompt}).param == "prompt"


def test_completion_refusals():
    assert refusal(CompletionRequest, {"prompt": "hi", "suffix": "x"}).param == "suffix"
    assert refusal(CompletionRequest, {"prompt": "hi", "echo": True, "logprobs": 1}).param == "echo"
    assert refusal(CompletionRequest, {"prompt": "hi", "logprobs": -1}).param == "logprobs"


# --- the router's error bodies (no handler runs: validation fails first) --------------------------


@pytest.fixture(scope="module")
def http():
    with TestClient(app) as client:
        yield client


def test_refusal_body_is_openai_shaped(http):
    """400 with {"error": {"message", "type", "param", "code"}} naming the refused field."""
    response = http.post("/v1/chat/completions", json={"messages": USER, "logit_bias": {"1": 2}})
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "`logit_bias` is not supported by this server: logit_bias is not supported by the token-id tier.",
            "type": "BadRequestError",
            "param": "logit_bias",
            "code": 400,
        }
    }


def test_type_errors_are_400_like_vllm(http):
    """A wrongly typed field is 400 (FastAPI would say 422), type "Bad Request" as in vLLM."""
    response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": "many"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", "body.max_tokens", 400)
    assert error["message"].startswith("1 validation error:")


def test_tokenize_picks_the_request_shape_by_its_fields(http):
    """`messages` makes a chat tokenize request: its refusals are about messages, not prompt."""
    response = http.post("/tokenize", json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content[0]"


def test_unknown_paths_get_openai_errors_too(http):
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404


def test_not_ready_is_503(http):
    """Before PromptService has built its handler, a valid request is 503, not a crash."""
    response = http.get("/v1/models")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "ServiceUnavailableError"
