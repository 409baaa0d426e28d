"""Tool calls and reasoning in chat answers, read by vLLM's own parsers in the front tier.

As `vllm serve --tool-call-parser NAME --reasoning-parser NAME` does, vLLM's `Parser` adjusts the
request (a grammar for a required or named tool choice; hermes keeps special tokens), then reads
the detokenized text, whole or delta by delta; the request is rebuilt as vLLM's own
`ChatCompletionRequest` for it. Requests without tools or a reasoning parser never come here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from services.errors import RequestError
from services.front.openai.protocol import ChatCompletionRequest, NamedToolChoice, ResponseFormat
from services.protocol import CONSTRAINTS, StructuredOutputs


def check_tool_choice(request: ChatCompletionRequest, tool_parsing: bool) -> None:
    """vLLM's refusal of a tool choice that needs a tool parser the server does not have
    (vllm/renderers/online_renderer.py, render_chat); the flags are PIPELINE_* settings here."""
    if tool_parsing or request.tool_choice in (None, "none"):
        return
    if request.tool_choice == "auto":
        raise RequestError(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
            "(here: PIPELINE_ENABLE_AUTO_TOOL_CHOICE=true and PIPELINE_TOOL_CALL_PARSER)",
            param="tool_choice",
        )
    if isinstance(request.tool_choice, NamedToolChoice):
        description = f'function "{request.tool_choice.function.name}"'
    else:
        description = f'"{request.tool_choice}"'
    raise RequestError(
        f"tool_choice={description} requires --tool-call-parser to be set (here: PIPELINE_TOOL_CALL_PARSER)",
        param="tool_choice",
    )


def make_tool_call_id() -> str:
    """A tool call's id as vLLM makes it (`chatcmpl-tool-` and 32 hex digits)."""
    try:
        from vllm.renderers.chat_utils import make_tool_call_id as make
    except ImportError:  # vLLM 0.26 (the GPU image)
        from vllm.entrypoints.chat_utils import make_tool_call_id as make
    return make()


def _vllm_request_class():
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmRequest
    except ImportError:  # older layout
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest as VllmRequest
    return VllmRequest


class ChatParsing:
    """One per PromptService worker: the composed vLLM parser class and the tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        enable_auto_tools: bool,
        tool_parser: str | None,
        tool_parser_plugin: str | None = None,
        reasoning_parser: str | None = None,
    ) -> None:
        from vllm.parser import ParserManager

        if tool_parser_plugin:
            from vllm.tool_parsers import ToolParserManager

            ToolParserManager.import_tool_parser(tool_parser_plugin)
        self.tokenizer = tokenizer
        self.enable_auto_tools = enable_auto_tools
        names = {"tool_parser_name": tool_parser, "reasoning_parser_name": reasoning_parser,
                 "enable_auto_tools": enable_auto_tools}
        try:  # newer vLLM also checks at start-up that the tokenizer has what the parsers need
            self.parser_cls = ParserManager.get_parser(**names, tokenizer=tokenizer)
        except TypeError as error:
            if "tokenizer" not in str(error):
                raise
            self.parser_cls = ParserManager.get_parser(**names)
        self.vllm_request_cls = _vllm_request_class()
        try:
            from vllm.exceptions import VLLMValidationError

            self.refusals: tuple[type[Exception], ...] = (ValueError, VLLMValidationError)
        except ImportError:
            self.refusals = (ValueError,)

    @property
    def tool_parsing(self) -> bool:
        return self.parser_cls is not None and self.parser_cls.tool_parser_cls is not None

    @property
    def reasoning(self) -> bool:
        return self.parser_cls is not None and self.parser_cls.reasoning_parser_cls is not None

    def wants(self, request: ChatCompletionRequest) -> bool:
        """Whether this request goes through the parsers (vLLM's parse of a request without tools
        and without a reasoning parser returns the text unchanged: skipping it is the same)."""
        if self.parser_cls is None:
            return False
        return self.reasoning or (bool(request.tools) and request.tool_choice != "none")

    def start(self, request: ChatCompletionRequest) -> ParsedChat:
        """vLLM's request, adjusted by a fresh parser as vLLM's renderer does."""
        body = request.model_dump(
            include={"messages", "tools", "tool_choice", "parallel_tool_calls", "response_format",
                     "structured_outputs", "skip_special_tokens", "include_reasoning", "chat_template_kwargs",
                     "add_generation_prompt", "continue_final_message"},
            by_alias=True, exclude_none=True,
        )
        body["messages"] = [message.model_dump(exclude_none=True) for message in request.messages]
        template_kwargs = dict(request.chat_template_kwargs or {})
        try:
            vllm_request = self.vllm_request_cls.model_validate(body)
            vllm_request = self._parser(vllm_request, template_kwargs).adjust_request(vllm_request)
        except self.refusals as error:  # vLLM's own checks of tools and constraints: the request's fault
            raise RequestError(str(error), param=getattr(error, "parameter", None)) from error
        return ParsedChat(self, vllm_request, template_kwargs)

    def _parser(self, vllm_request: Any, template_kwargs: dict[str, Any]) -> Any:
        return self.parser_cls(self.tokenizer, vllm_request.tools, chat_template_kwargs=template_kwargs)


class ParsedChat:
    """One chat request through vLLM's parsers: what it sends the engine, how its text is read."""

    def __init__(self, parsing: ChatParsing, vllm_request: Any, template_kwargs: dict[str, Any]) -> None:
        self.parsing = parsing
        self.request = vllm_request
        self.template_kwargs = template_kwargs
        choice = vllm_request.tool_choice
        self.named_function = None if isinstance(choice, str) or choice is None else choice.function.name
        self.required = choice == "required"

    @property
    def skip_special_tokens(self) -> bool:
        return bool(self.request.skip_special_tokens)

    def grammar(self) -> StructuredOutputs | None:
        """The constraint after the parser's adjustment, in the contract's shape."""
        extract = getattr(self.request, "extract_structured_outputs", None)
        if extract is None:  # older vLLM: response_format is applied when its SamplingParams are made
            response_format = self.request.response_format
            if self.request.structured_outputs is None and response_format is not None:
                constraint = ResponseFormat.model_validate(response_format.model_dump(by_alias=True)).constraint()
                return StructuredOutputs.model_validate(constraint) if constraint else None
        params = extract() if extract is not None else self.request.structured_outputs
        if params is None:
            return None
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if not f.name.startswith("_")}
        return StructuredOutputs.model_validate({k: v for k, v in fields.items() if v is not None or k not in CONSTRAINTS})

    def parser(self) -> Any:
        """A fresh parser: they are stateful, so one per choice (as vLLM does)."""
        return self.parsing._parser(self.request, self.template_kwargs)

    # --- a whole answer ------------------------------------------------------------------------

    def message(self, text: str, token_ids: list[int], prompt_ids: list[int]) -> tuple[dict[str, Any], bool]:
        """(reasoning, content, tool_calls) of a finished choice as vLLM's full generator builds
        its message, and whether its finish reason becomes "tool_calls" for auto tool choice."""
        parser = self.parser()
        if hasattr(parser, "set_prompt_token_ids"):  # vLLM 0.26's parse() does not read the prompt
            parser.set_prompt_token_ids(prompt_ids)
        reasoning, content, tool_calls = parser.parse(
            text, self.request, enable_auto_tools=self.parsing.enable_auto_tools, model_output_token_ids=token_ids
        )
        if not self.request.include_reasoning:
            reasoning = None
        calls = [
            {"id": call.id or make_tool_call_id(), "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for call in (tool_calls or [])
        ]
        auto_called = False
        if self.named_function is not None or self.required:
            message = {"reasoning": reasoning, "content": content or "", "tool_calls": calls}
        elif not self.parsing.tool_parsing or self.request.tool_choice in (None, "none"):
            message = {"reasoning": reasoning, "content": content}
        else:  # auto
            auto_called = bool(calls)
            message = {"reasoning": reasoning, "content": content, "tool_calls": calls}
        if self.request.parallel_tool_calls is False and message.get("tool_calls"):
            message["tool_calls"] = message["tool_calls"][:1]
        return message, auto_called

    def finish_reason(self, engine_reason: str | None, auto_called: bool) -> str:
        """vLLM's rule: "tool_calls" when auto tool choice called a tool, or for "required" that
        stopped; a named function keeps "stop"."""
        if auto_called or (self.required and engine_reason == "stop"):
            return "tool_calls"
        return engine_reason or "stop"

    # --- a stream ----------------------------------------------------------------------------

    def stream(self, prompt_ids: list[int]) -> StreamedChoice:
        return StreamedChoice(self, self.parser(), prompt_ids)


class StreamedChoice:
    """One streamed choice: each delta of text through `parse_delta`, as vLLM's stream generator."""

    def __init__(self, chat: ParsedChat, parser: Any, prompt_ids: list[int]) -> None:
        self.chat = chat
        self.parser = parser
        self.prompt_ids = prompt_ids
        self.tools_streamed = False

    def delta(self, text: str, token_ids: list[int], finished: bool) -> dict[str, Any] | None:
        """The delta message (`content`, `reasoning`, `tool_calls`) to send, or None for nothing."""
        message = self.parser.parse_delta(
            delta_text=text, delta_token_ids=list(token_ids), request=self.chat.request,
            prompt_token_ids=self.prompt_ids, finished=finished,
        )
        if message is None:
            return None
        if message.tool_calls:
            self.tools_streamed = True
        delta = message.model_dump(exclude_none=True, include={"content", "reasoning", "tool_calls"})
        if self.chat.request.parallel_tool_calls is False and delta.get("tool_calls"):
            delta["tool_calls"] = [call for call in delta["tool_calls"] if call.get("index") == 0]
        return delta

    def finish_reason(self, engine_reason: str | None) -> str:
        if self.tools_streamed and self.chat.named_function is None and engine_reason == "stop":
            return "tool_calls"
        return engine_reason or "stop"
