"""/v1/chat/completions: messages in, a chat completion or its SSE chunks out.

The messages are templated (with the tools, when given) and tokenized here; vLLM's tool and
reasoning parsers (parsing.py), when configured, shape the request and read the text back. A
stream sends a role chunk per choice first, then deltas, an optional usage chunk and `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from services.errors import RequestError
from services.front.generation import TextChunk
from services.front.openai.logprobs import LogprobsBuilder
from services.front.openai.parsing import ParsedChat, check_tool_choice
from services.front.openai.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
)
from services.front.openai.serving import OpenAIServing, error_response, sse, usage_chunk, usage_info


async def create_chat_completion(
    serving: OpenAIServing, request: ChatCompletionRequest, request_id: str | None = None
) -> ChatCompletionResponse | AsyncIterator[str]:
    """/v1/chat/completions: the whole response, or its SSE chunks when `stream` is set."""
    adapter = await serving.adapter_for(request.model)
    parsing = serving.parsing
    check_tool_choice(request, parsing is not None and parsing.tool_parsing)
    parsed = parsing.start(request) if parsing is not None and parsing.wants(request) else None
    messages = [m.for_template() for m in request.messages]
    template_options = request.template_options()
    if request.tools:  # rendered whatever the tool choice, as vLLM does
        template_options["template_kwargs"]["tools"] = [tool.for_template() for tool in request.tools]
    ids = serving.generation.chat_prompt(messages, add_special_tokens=request.add_special_tokens, **template_options)
    if not ids:
        raise RequestError("The conversation renders to an empty prompt.", param="messages")
    requested, param = request.requested_max_tokens()
    params = serving.generation.sampling_params(
        len(ids),
        serving.max_tokens(len(ids), requested, param),
        **request.sampling_fields(serving.sampling_defaults),
        logprobs=request.top_logprobs if request.logprobs else None,
        structured_outputs=serving.grammar(request, parsed),
    )
    serving.generation.admit(params.n)
    role = "assistant" if request.add_generation_prompt else (messages[-1]["role"] if messages else "assistant")
    echo = ""
    if request.echo and messages and messages[-1]["role"] == role:
        echo = messages[-1]["content"]
    response_id = f"chatcmpl-{request_id or request.request_id}"
    source = await serving.stream_started(adapter, serving.generation.stream(ids, params, serving.options(request, parsed), adapter=adapter))
    if request.stream:
        return _chat_stream(serving, request, source, response_id, role, echo, ids, parsed)
    return await _chat_full(serving, request, source, response_id, role, echo, ids, parsed)


async def _chat_full(
    serving: OpenAIServing, request: ChatCompletionRequest, source: AsyncIterator[TextChunk], response_id: str,
    role: str, echo: str, prompt_ids: list[int], parsed: ParsedChat | None = None,
) -> ChatCompletionResponse:
    n = request.n or 1
    texts, token_ids = [""] * n, [[] for _ in range(n)]
    builders = [LogprobsBuilder(serving.strings) for _ in range(n)]
    logprobs = [ChatCompletionLogProbs(content=[]) for _ in range(n)]
    finished: list[TextChunk | None] = [None] * n
    async with aclosing(source):
        async for chunk in source:
            i = chunk.index
            texts[i] += chunk.text
            token_ids[i] += chunk.token_ids
            if request.logprobs and chunk.logprobs:
                logprobs[i].content += builders[i].chat(chunk.token_ids, chunk.logprobs, request.top_logprobs).content
            if chunk.finish_reason is not None:
                finished[i] = chunk
    choices = []
    for i in range(n):
        engine_reason = finished[i].finish_reason if finished[i] else None
        message, finish_reason = ChatMessage(role=role, content=echo + texts[i]), engine_reason or "stop"
        if parsed is not None:
            fields, auto_called = parsed.message(texts[i], token_ids[i], prompt_ids)
            if echo and fields.get("content") is not None:
                fields["content"] = echo + fields["content"]
            message = ChatMessage(role=role, **fields)
            finish_reason = parsed.finish_reason(engine_reason, auto_called)
        choices.append(
            ChatCompletionResponseChoice(
                index=i,
                message=message,
                logprobs=logprobs[i] if request.logprobs else None,
                finish_reason=finish_reason,
                stop_reason=serving.stop_reason(finished[i], request) if finished[i] else None,
                token_ids=token_ids[i] if request.return_token_ids else None,
            )
        )
    completion_tokens = sum(f.completion_tokens for f in finished if f)
    return ChatCompletionResponse(
        id=response_id,
        model=request.model or serving.model_name,
        choices=choices,
        usage=usage_info(len(prompt_ids), completion_tokens),
        prompt_token_ids=prompt_ids if request.return_token_ids else None,
    )


async def _chat_stream(
    serving: OpenAIServing, request: ChatCompletionRequest, source: AsyncIterator[TextChunk], response_id: str,
    role: str, echo: str, prompt_ids: list[int], parsed: ParsedChat | None = None,
) -> AsyncIterator[str]:
    n = request.n or 1
    streams = [parsed.stream(prompt_ids) for _ in range(n)] if parsed is not None else None
    created = int(time.time())
    prompt_tokens = len(prompt_ids)
    builders = [LogprobsBuilder(serving.strings) for _ in range(n)]
    tokens_so_far = [0] * n
    finish_sent = [False] * n

    def chunk_json(choice: ChatCompletionResponseStreamChoice, completion_tokens: int | None = None, **extra: Any) -> str:
        response = ChatCompletionStreamResponse(
            id=response_id, object="chat.completion.chunk", created=created, model=request.model or serving.model_name,
            choices=[choice], **extra,
        )
        if request.continuous_usage and completion_tokens is not None:
            response.usage = usage_info(prompt_tokens, completion_tokens)
        return sse(response.model_dump_json(exclude_unset=True))

    try:
        async with aclosing(source):
            for i in range(n):
                yield chunk_json(
                    ChatCompletionResponseStreamChoice(
                        index=i, delta=DeltaMessage(role=role, content=""), logprobs=None, finish_reason=None
                    ),
                    0,
                    prompt_token_ids=prompt_ids if request.return_token_ids else None,
                    prompt_text=None,
                )
            if echo:
                for i in range(n):
                    yield chunk_json(
                        ChatCompletionResponseStreamChoice(
                            index=i, delta=DeltaMessage(content=echo), logprobs=None, finish_reason=None
                        ),
                        0,
                    )
            async for chunk in source:
                i = chunk.index
                if finish_sent[i]:
                    continue
                if not chunk.text and not chunk.token_ids and not tokens_so_far[i] and chunk.finish_reason is None:
                    continue
                tokens_so_far[i] = chunk.completion_tokens
                logprobs = None
                if request.logprobs:
                    logprobs = builders[i].chat(chunk.token_ids, chunk.logprobs or [], request.top_logprobs)
                delta, finish_reason = DeltaMessage(content=chunk.text), chunk.finish_reason
                if streams is not None:  # vLLM's parsers: reasoning, content and tool-call deltas
                    parsed_delta = streams[i].delta(chunk.text, chunk.token_ids, chunk.finish_reason is not None)
                    if parsed_delta is None and chunk.finish_reason is None and logprobs is None \
                            and not request.return_token_ids:
                        continue
                    delta = DeltaMessage(**(parsed_delta or {}))
                    if chunk.finish_reason is not None:
                        finish_reason = streams[i].finish_reason(chunk.finish_reason)
                fields: dict[str, Any] = {
                    "index": i,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                    "token_ids": list(chunk.token_ids) if request.return_token_ids else None,
                }
                if chunk.finish_reason is not None:
                    fields["stop_reason"] = serving.stop_reason(chunk, request)
                    finish_sent[i] = True
                yield chunk_json(ChatCompletionResponseStreamChoice(**fields), tokens_so_far[i])
        if request.include_usage:
            yield usage_chunk(ChatCompletionStreamResponse, response_id, created, request.model or serving.model_name,
                              prompt_tokens, sum(tokens_so_far))
    except RequestError as error:
        yield sse(error_response(error).model_dump_json())
    yield sse("[DONE]")
