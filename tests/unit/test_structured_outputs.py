"""Structured outputs and tool calling, without a server or an engine: the contract, the OpenAI
fields, vLLM's checks and messages, the grammar the engine gets, the hermes template, and vLLM's
parsers reading tool calls out of text (whole and streamed)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from test_openai_protocol import refusal  # the ProtocolError behind a refused request body

from services.errors import RequestError
from services.front.openai.parsing import ChatParsing, check_tool_choice
from services.front.openai.protocol import ChatCompletionRequest, CompletionRequest
from services.front.text.templates import ChatFormatter, load_chat_template
from services.gpu.engine_io import vllm_sampling_params
from services.protocol import GenerateRequest, SamplingParams, StructuredOutputs

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
CALL_TEXT = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# --- the contract ----------------------------------------------------------------------------------


def test_the_contract_carries_one_constraint_and_vllms_options():
    grammar = StructuredOutputs.model_validate({"json": SCHEMA, "disable_any_whitespace": True})
    params = SamplingParams(max_tokens=8, structured_outputs=grammar)
    again = SamplingParams.model_validate_json(params.model_dump_json())  # what crosses the tiers
    assert again.structured_outputs == grammar
    assert grammar.engine_fields() == {"json": SCHEMA, "disable_any_whitespace": True}
    for bad in ({}, {"regex": "a", "choice": ["a"]}, {"regex": "a", "unknown": 1}):
        with pytest.raises(ValidationError):
            StructuredOutputs.model_validate(bad)


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}},
    {"structured_outputs": {"choice": ["yes", "no"]}},
    {"structured_outputs": {"regex": r"\d+"}},
    {"structured_outputs": {"grammar": 'root ::= "a" | "b"'}},
    {"structured_outputs": {"json": SCHEMA, "disable_additional_properties": True}},
    {"structured_outputs": {"disable_any_whitespace": True, "json_object": True}},
])  # fmt: skip
def test_the_engine_gets_the_grammar_vllms_server_would_give_it(body):
    """Our fields -> contract -> LLMService's vLLM SamplingParams, against vLLM's own request model."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

    body = {"model": "m", "messages": USER, "max_tokens": 16, **body}
    ours = ChatCompletionRequest.model_validate(body)
    contract = SamplingParams(max_tokens=16, structured_outputs=ours.grammar())
    engine = vllm_sampling_params(GenerateRequest(request_id="r", token_ids=[1], sampling_params=contract))
    theirs = VllmChatRequest.model_validate(body).to_sampling_params(16, {})
    assert engine.structured_outputs == theirs.structured_outputs


def test_completions_take_structured_outputs_too():
    request = CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}})
    assert request.grammar() == StructuredOutputs(json_object=True)
    assert CompletionRequest.model_validate({"prompt": "x"}).grammar() is None


def test_response_format_text_asks_for_nothing():
    assert ChatCompletionRequest.model_validate({"messages": USER, "response_format": {"type": "text"}}).grammar() is None


# --- vLLM's checks, with its messages --------------------------------------------------------------


def test_tool_and_format_refusals_name_the_field():
    assert refusal(ChatCompletionRequest, {"messages": USER, "tools": []}).param == "tools"
    assert refusal(ChatCompletionRequest, {"messages": USER, "tool_choice": "required"}).param == "tool_choice"
    assert refusal(ChatCompletionRequest, {"messages": USER, "tools": [WEATHER], "tool_choice": "always"}).param == "tool_choice"
    unknown = refusal(ChatCompletionRequest, {"messages": USER, "tools": [WEATHER],
                                              "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert unknown.param == "tool_choice" and "does not match any of the specified `tools`" in unknown.message
    assert refusal(ChatCompletionRequest, {"messages": USER, "tools": [WEATHER],
                                           "tool_choice": {"type": "function", "function": {}}}).param == "tool_choice.function.name"
    assert refusal(ChatCompletionRequest, {"messages": USER, "response_format": {"type": "json_schema"}}).param == "response_format"
    both = refusal(ChatCompletionRequest, {"messages": USER, "tools": [WEATHER], "structured_outputs": {"regex": "a"},
                                           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert "not both" in both.message
    with pytest.raises(ValidationError):  # two constraints
        ChatCompletionRequest.model_validate({"messages": USER, "structured_outputs": {"regex": "a", "choice": ["a"]}})


def test_tools_default_to_auto_and_render_as_vllm_hands_them():
    request = ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER]})
    assert request.tool_choice == "auto"
    assert request.tools[0].for_template() == {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER["function"]["parameters"]}}
    assert ChatCompletionRequest.model_validate({"messages": USER}).tool_choice == "none"


@pytest.mark.parametrize(("choice", "needle"), [
    ("auto", '"auto" tool choice requires --enable-auto-tool-choice'),
    ("required", 'tool_choice="required" requires --tool-call-parser'),
    ({"type": "function", "function": {"name": "get_weather"}}, 'function "get_weather" requires --tool-call-parser'),
])  # fmt: skip
def test_tools_while_auto_tool_choice_is_off_are_refused_as_vllm_does(choice, needle):
    request = ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER], "tool_choice": choice})
    with pytest.raises(RequestError) as caught:
        check_tool_choice(request, tool_parsing=False)
    assert caught.value.status == 400 and needle in caught.value.message
    check_tool_choice(request, tool_parsing=True)
    check_tool_choice(ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER], "tool_choice": "none"}),
                      tool_parsing=False)


# --- the hermes template -------------------------------------------------------------------------


def test_hermes_template_without_tools_is_smollm2s_own(tokenizer):
    own = ChatFormatter(tokenizer, load_chat_template("model", tokenizer.chat_template))
    hermes = ChatFormatter(tokenizer, load_chat_template("hermes", tokenizer.chat_template))
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        for add_generation_prompt in (True, False):
            assert hermes.render(messages, add_generation_prompt=add_generation_prompt) == \
                own.render(messages, add_generation_prompt=add_generation_prompt)


def test_hermes_template_renders_tools_calls_and_results(tokenizer):
    hermes = ChatFormatter(tokenizer, load_chat_template("hermes", tokenizer.chat_template))
    messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "1", "content": "21 C"}]
    text = hermes.render(messages, template_kwargs={"tools": [WEATHER]})
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>" in text


# --- vLLM's parsers on the front tier's text ---------------------------------------------------------


@pytest.fixture(scope="module")
def hermes(tokenizer):
    return ChatParsing(tokenizer, enable_auto_tools=True, tool_parser="hermes")


def test_auto_tool_choice_reads_the_call_out_of_the_text(hermes):
    request = ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER]})
    assert hermes.wants(request)
    chat = hermes.start(request)
    assert chat.skip_special_tokens is False  # hermes' adjust_request, forwarded to the detokenizer
    message, auto_called = chat.message(CALL_TEXT, [], [1])
    assert auto_called and chat.finish_reason("stop", auto_called) == "tool_calls"
    assert message["content"] == "Let me check."
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_streamed_tool_calls_reassemble(hermes):
    chat = hermes.start(ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER]}))
    stream = chat.stream([1])
    content, name, arguments = "", "", ""
    pieces = [CALL_TEXT[i:i + 5] for i in range(0, len(CALL_TEXT), 5)]
    for n, piece in enumerate(pieces):
        delta = stream.delta(piece, [0], finished=n == len(pieces) - 1)
        for call in (delta or {}).get("tool_calls", []):
            name += call["function"].get("name") or ""
            arguments += call["function"].get("arguments") or ""
        content += (delta or {}).get("content") or ""
    assert (content, name, json.loads(arguments)) == ("Let me check.", "get_weather", {"city": "Paris"})
    assert stream.finish_reason("stop") == "tool_calls"


def test_required_and_named_choice_send_the_engine_a_grammar(hermes):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        chat = hermes.start(ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER], "tool_choice": choice}))
        grammar = chat.grammar()
        assert grammar is not None and (grammar.structural_tag or grammar.json_)
        assert "get_weather" in json.dumps(grammar.engine_fields())
    chat = hermes.start(ChatCompletionRequest.model_validate(
        {"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
    message, _ = chat.message(CALL_TEXT[len("Let me check."):], [], [1])
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert chat.finish_reason("stop", False) == "stop"  # a named function keeps "stop", as in vLLM


def test_requests_without_tools_skip_the_parsers(hermes):
    """No tools (or tool_choice none) and no reasoning parser: the hot path is untouched."""
    assert not hermes.wants(ChatCompletionRequest.model_validate({"messages": USER}))
    assert not hermes.wants(ChatCompletionRequest.model_validate({"messages": USER, "tools": [WEATHER], "tool_choice": "none"}))


def test_reasoning_is_split_from_content(tokenizer):
    """PIPELINE_REASONING_PARSER: vLLM's reasoning parser splits `reasoning` from `content`,
    whole and streamed (a tokenizer with <think> tokens, as reasoning models have)."""
    import copy

    thinking = copy.deepcopy(tokenizer)
    thinking.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    parsing = ChatParsing(thinking, enable_auto_tools=False, tool_parser=None, reasoning_parser="deepseek_r1")
    request = ChatCompletionRequest.model_validate({"messages": USER})
    assert parsing.wants(request)
    chat = parsing.start(request)
    text = "<think>It is in France.</think>Paris is sunny."
    ids = thinking.encode(text, add_special_tokens=False)
    message, _ = chat.message(text, ids, [1])
    assert (message["reasoning"], message["content"]) == ("It is in France.", "Paris is sunny.")
    stream = chat.stream([1])
    reasoning = content = ""
    for n, token in enumerate(ids):
        piece = thinking.decode([token], skip_special_tokens=False)
        delta = stream.delta(piece, [token], finished=n == len(ids) - 1) or {}
        reasoning += delta.get("reasoning") or ""
        content += delta.get("content") or ""
    assert (reasoning, content) == ("It is in France.", "Paris is sunny.")
