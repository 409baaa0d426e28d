"""OpenAI-compatible request and response models, shaped after vLLM 0.32's own server.

Two deliberate differences, both "never ignore silently": a field this server does not implement
(images, audio, logit_bias, ...) and a field nobody knows (a typo) are refused with 400 naming the
field. Every refusal raises `ProtocolError`, a ValueError that carries the field for the body's `param`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_serializer, model_validator

from services.protocol import StructuredOutputs

MAX_STOP_STRINGS = 4  # vLLM's VLLM_MAX_STOP_STRINGS
MAX_COMPLETION_PROMPTS = 1024  # vLLM's VLLM_MAX_COMPLETION_PROMPTS
INT64 = {"ge": -(2**63), "le": 2**63 - 1}


class ProtocolError(ValueError):
    """A refused request field: what is wrong, and the field (`param` of the error body)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def random_uuid() -> str:
    return uuid.uuid4().hex


# --- what is refused -------------------------------------------------------------------------

# field -> (values that mean "not used", why it is refused). Present with another value: 400.
_NOT_SUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "functions": ((None,), "the deprecated `functions` are not supported; use `tools`"),
    "function_call": ((None, "none"), "the deprecated `function_call` is not supported; use `tool_choice`"),
    "logit_bias": ((None, {}), "logit_bias is not supported by the token-id tier"),
    "allowed_token_ids": ((None,), "allowed_token_ids is not supported by the token-id tier"),
    "bad_words": ((None, []), "bad_words is not supported by the token-id tier"),
    "logprob_token_ids": ((None,), "logprob_token_ids is not supported"),
    "prompt_logprobs": ((None,), "prompt logprobs are not supported"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "length_penalty": ((None, 1.0), "length_penalty only applies to beam search, which is not supported"),
    "prompt_embeds": ((None,), "prompt embeddings are not supported"),
    "suffix": ((None,), "suffix (fill-in-the-middle) is not supported"),
    "truncate_prompt_tokens": ((None,), "prompt truncation is not supported; shorten the prompt"),
    "chat_template": ((None,), "a chat template in the request is not accepted; the server's is used"),
    "spaces_between_special_tokens": ((None, True), "only spaces_between_special_tokens=true is supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported"),
    "priority": ((None, 0), "request priorities are not supported"),
    "service_tier": ((None, "auto", "default"), "service tiers are not supported"),
    "store": ((None, False), "stored completions are not supported"),
    "metadata": ((None, {}), "metadata is only used with store, which is not supported"),
}

_ALLOWED_ROLES = ("system", "user", "assistant", "developer", "tool")


def _reject_unsupported(data: Any, fields: set[str]) -> Any:
    """Refuse unsupported and unknown fields with a message that names them."""
    if not isinstance(data, dict):
        return data
    for name, value in data.items():
        if name in _NOT_SUPPORTED:
            unused, why = _NOT_SUPPORTED[name]
            if value is not None and value not in unused:
                raise ProtocolError(f"`{name}` is not supported by this server: {why}.", param=name)
        elif name not in fields:
            raise ProtocolError(f"Unknown field `{name}`: this server does not know it, so it refuses it "
                                "rather than ignoring it.", param=name)
    return data


def _check_stream_options(data: dict) -> None:
    if data.get("stream_options") and not data.get("stream"):
        raise ProtocolError("Stream options can only be defined when `stream=True`.", param="stream_options")


# --- requests ----------------------------------------------------------------------------------


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are refused by _reject_unsupported

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        return _reject_unsupported(data, set(cls.model_fields) | set(_NOT_SUPPORTED))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class FunctionCallParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCallParam(BaseModel):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallParam

    def for_template(self) -> dict[str, Any]:
        """Arguments as a dict, as tool-use chat templates expect them (vLLM's
        _postprocess_messages: a string that is not a JSON object becomes {})."""
        arguments = self.function.arguments
        if isinstance(arguments, str) and arguments:
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        call: dict[str, Any] = {"type": "function", "function": {
            "name": self.function.name, "arguments": arguments if isinstance(arguments, dict) else {},
        }}
        if self.id is not None:
            call["id"] = self.id
        return call


class ChatMessageParam(BaseModel):
    """One message: a role, and its content as a string or a list of text parts; an assistant
    message may carry the tool calls it made, a `tool` message answers one (`tool_call_id`)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined with newlines (vLLM's
        "string" content format)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning is not None:
            message["reasoning"] = message["reasoning_content"] = self.reasoning
        if self.name is not None:
            message["name"] = self.name
        return message


def _check_messages(messages: Any) -> None:
    """Clear refusals for what the message models would only call 'invalid'."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "function":
            raise ProtocolError(f"messages[{i}]: role `function` (deprecated) is not supported; use `tool` messages.",
                                param=f"messages[{i}].role")
        if role is not None and role not in _ALLOWED_ROLES:
            raise ProtocolError(f"messages[{i}]: unknown role `{role}`; allowed: {', '.join(_ALLOWED_ROLES)}.",
                                param=f"messages[{i}].role")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ProtocolError(f"messages[{i}]: a `tool` message needs `tool_call_id`, the id of the assistant tool "
                                "call whose result it carries.", param=f"messages[{i}].tool_call_id")
        if message.get("tool_calls") and role != "assistant":
            raise ProtocolError(f"messages[{i}]: only assistant messages carry `tool_calls`.",
                                param=f"messages[{i}].tool_calls")
        if message.get("tool_call_id") is not None and role != "tool":
            raise ProtocolError(f"messages[{i}]: only `tool` messages carry `tool_call_id`.",
                                param=f"messages[{i}].tool_call_id")
        for key in ("function_call", "audio", "refusal", "reasoning_content"):
            if message.get(key):
                raise ProtocolError(f"messages[{i}]: `{key}` is not supported.", param=f"messages[{i}].{key}")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ProtocolError(
                        f"messages[{i}].content[{j}]: content parts of type `{kind}` are not supported; "
                        "this server takes text only.",
                        param=f"messages[{i}].content[{j}]",
                    )


# --- structured outputs and tools (vLLM's shapes) -------------------------------------------------


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text`, `json_object`, `json_schema`, or vLLM's `structural_tag` (its fields kept as given)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> dict[str, Any] | None:
        """The structured-outputs constraint this format stands for (vLLM's
        structured_outputs_from_response_format); None for text."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            assert self.json_schema is not None
            return {"json": self.json_schema.json_schema}
        if self.type == "structural_tag":
            return {"structural_tag": json.dumps({"type": self.type, **(self.model_extra or {})})}
        return None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionDefinition

    def for_template(self) -> dict[str, Any]:
        """The tool as vLLM hands it to the chat template (`strict` only when given)."""
        return {"type": self.type, "function": self.function.model_dump(exclude={"strict"} if self.function.strict is None else set())}


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    function: NamedFunction
    type: Literal["function"] = "function"


def _check_response_format(data: dict) -> None:
    response_format = data.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema" \
            and response_format.get("json_schema") is None:
        raise ProtocolError("When response_format type is 'json_schema', the 'json_schema' field must be provided.",
                            param="response_format")
    structured = data.get("structured_outputs")
    if structured is not None and not isinstance(structured, dict):
        raise ProtocolError("`structured_outputs` must be an object.", param="structured_outputs")


_TOOL_CHOICE_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def _check_tools(data: dict) -> dict:
    """vLLM's tool checks (ChatCompletionRequest.check_tool_usage), with its messages; a missing
    tool_choice becomes "auto" when tools are given."""
    tools = data.get("tools")
    if tools == []:
        raise ProtocolError("`tools` must not be an empty array. Either provide at least one tool or omit the field "
                            "entirely.", param="tools")
    if "tool_choice" not in data and tools:
        data = {**data, "tool_choice": "auto"}
    choice = data.get("tool_choice")
    structured = data.get("structured_outputs")
    if isinstance(structured, dict) and any(structured.get(k) is not None for k in ("json", "regex", "choice")) \
            and choice not in (None, "none", "auto", "required"):
        raise ProtocolError("You can only either use constraints for structured outputs or tools, not both.",
                            param="structured_outputs")
    if choice is None or choice == "none":
        return data
    if tools is None:
        raise ProtocolError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise ProtocolError(f"Invalid value for `tool_choice`: {choice}! Only named tools, \"none\", \"auto\" or "
                            "\"required\" are supported.", param="tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        if not isinstance(function, dict):
            raise ProtocolError(f"Invalid value for `function`: `{function}` in `tool_choice`! {_TOOL_CHOICE_USAGE}",
                                param="tool_choice.function")
        if "name" not in function:
            raise ProtocolError(f"Expected field `name` in `function` in `tool_choice`! {_TOOL_CHOICE_USAGE}",
                                param="tool_choice.function.name")
        name = function["name"]
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_TOOL_CHOICE_USAGE}",
                                param="tool_choice.function.name")
        names = [tool.get("function", {}).get("name") for tool in tools if isinstance(tool, dict)]
        if name not in names:
            raise ProtocolError(f"The tool specified in `tool_choice` does not match any of the specified `tools` "
                                f"(`{name}` is not among {names}).", param="tool_choice")
    return data


class StructuredOutputFields(BaseModel):
    """`response_format` and vLLM's `structured_outputs`, shared by chat and completions."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def grammar(self) -> StructuredOutputs | None:
        """The constraint the engine applies: `structured_outputs`, with `response_format`
        overriding its constraint as in vLLM (structured_outputs_from_response_format)."""
        constraint = self.response_format.constraint() if self.response_format is not None else None
        if constraint is None:
            return self.structured_outputs
        if self.structured_outputs is None:
            return StructuredOutputs.model_validate(constraint)
        try:
            return StructuredOutputs.model_validate({**self.structured_outputs.model_dump(by_alias=True), **constraint})
        except ValidationError as error:
            raise ProtocolError(f"`response_format` and `structured_outputs` give two constraints: "
                                f"{error.errors()[0]['msg']}", param="response_format") from error


StopParam = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None
# `top_logprobs` is nullable in the OpenAI spec; null means the same as omitted (vLLM).
TopLogprobs = Annotated[int, BeforeValidator(lambda v: 0 if v is None else v)]


class SamplingFields(RequestModel, StructuredOutputFields):
    """What chat and completion requests share: sampling, stopping and output options."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int | None = 1
    seed: Annotated[int, Field(**INT64)] | None = None
    stop: StopParam = []
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = True
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    request_id: str = Field(default_factory=random_uuid, max_length=100)
    return_token_ids: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _stream_options_need_stream(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _check_stream_options(data)
            _check_response_format(data)
        return data

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_fields(self, model_defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Sampling parameters for the GPU tier. What the request leaves unset takes the model's
        default (its generation_config.json, as `vllm serve` applies it), else vLLM's."""
        defaults = model_defaults or {}

        def chosen(value: Any, name: str, default: Any) -> Any:
            return defaults.get(name, default) if value is None else value

        return {
            "n": self.n if self.n is not None else 1,
            "temperature": chosen(self.temperature, "temperature", 1.0),
            "top_p": chosen(self.top_p, "top_p", 1.0),
            "top_k": chosen(self.top_k, "top_k", 0),
            "min_p": chosen(self.min_p, "min_p", 0.0),
            "seed": self.seed,
            "presence_penalty": 0.0 if self.presence_penalty is None else self.presence_penalty,
            "frequency_penalty": 0.0 if self.frequency_penalty is None else self.frequency_penalty,
            "repetition_penalty": chosen(self.repetition_penalty, "repetition_penalty", 1.0),
            "stop_token_ids": list(self.stop_token_ids or []),
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageParam]
    logprobs: bool | None = False
    top_logprobs: TopLogprobs = 0
    max_tokens: int | None = Field(None, description="deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: int | None = None
    echo: bool = Field(False, description="prepend the last message when it has the response's role")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = "none"
    include_reasoning: bool = True

    @model_validator(mode="before")
    @classmethod
    def _check_chat(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        _check_messages(data.get("messages"))
        data = _check_tools(data)
        top_logprobs = data.get("top_logprobs")
        if top_logprobs is not None:
            if not isinstance(top_logprobs, int) or top_logprobs < 0:
                raise ProtocolError("`top_logprobs` must be a non-negative integer.", param="top_logprobs")
            if top_logprobs > 0 and not data.get("logprobs"):
                raise ProtocolError("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
        if data.get("continue_final_message") and data.get("add_generation_prompt", True):
            raise ProtocolError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                param="continue_final_message",
            )
        return data

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The output limit asked for and the field it came from (max_completion_tokens first)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def template_options(self) -> dict[str, Any]:
        extra = dict(self.chat_template_kwargs or {})
        if self.documents is not None:
            extra["documents"] = self.documents
        return {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "template_kwargs": extra,
        }


class CompletionRequest(SamplingFields):
    prompt: list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]] | str | list[str] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    add_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _check_completion(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        prompt = data.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise ProtocolError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        if isinstance(prompt, list) and not all(isinstance(p, int) for p in prompt) and len(prompt) > MAX_COMPLETION_PROMPTS:
            raise ProtocolError(f"prompt list length {len(prompt)} exceeds the maximum allowed count of "
                                f"{MAX_COMPLETION_PROMPTS}.", param="prompt")
        logprobs = data.get("logprobs")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0):
            raise ProtocolError("`logprobs` must be a non-negative integer.", param="logprobs")
        if data.get("echo") and logprobs is not None:
            raise ProtocolError("`echo` with `logprobs` needs prompt logprobs, which are not supported.", param="echo")
        if data.get("max_tokens") is None:  # null means the default, as in vLLM
            data = {**data, "max_tokens": cls.model_fields["max_tokens"].default}
        return data

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt or [])


class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(RequestModel):
    model: str | None = None
    messages: list[ChatMessageParam]
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_chat(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _check_messages(data.get("messages"))
            if data.get("continue_final_message") and data.get("add_generation_prompt", True):
                raise ProtocolError(
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                    param="continue_final_message",
                )
        return data


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]]


# --- responses ---------------------------------------------------------------------------------


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class _DropsEmptyToolCalls(OpenAIBaseModel):
    @model_serializer(mode="wrap")
    def _serialize(self, handler):
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ChatMessage(_DropsEmptyToolCalls):
    role: str
    content: str | None = None
    refusal: str | None = None
    annotations: Any | None = None
    audio: Any | None = None
    function_call: Any | None = None
    tool_calls: list[Any] = Field(default_factory=list)
    reasoning: str | None = None


class DeltaMessage(_DropsEmptyToolCalls):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[Any] = Field(default_factory=list)


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{random_uuid()}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    prompt_logprobs: list[Any] | None = None
    prompt_token_ids: list[int] | None = None


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{random_uuid()}")
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = Field(default=None)
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: list[Any] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{random_uuid()}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo


class CompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{random_uuid()}")
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = Field(default=None)


class ModelPermission(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{random_uuid()}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
