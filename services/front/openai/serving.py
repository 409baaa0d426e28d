"""The OpenAI handlers: requests in, `TextGeneration` calls, OpenAI responses and SSE chunks out.

Behaviour follows vLLM's own server (vllm/entrypoints/openai/chat_completion/serving.py,
completion/serving.py, serve/tokenize/serving.py): the same max_tokens rule (clamped to what the
context leaves, an error only when the prompt alone is too long or max_tokens exceeds the
context), the same chunk sequence (a role chunk per choice first, then deltas, then an optional
usage chunk and `[DONE]`), the same echo, n and logprobs shapes.

One difference on purpose: a streamed request's first engine output is awaited before the
response starts, so an error that happens before any token (the GPU tier refusing, being down)
gets its real HTTP status instead of a 200 with an error event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from services.errors import RequestError, openai_error
from services.front.generation import TextChunk, TextGeneration, TextOptions
from services.front.openai.logprobs import LogprobsBuilder, TokenStrings
from services.front.openai.parsing import ChatParsing, ParsedChat, check_tool_choice
from services.front.openai.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelPermission,
    ProtocolError,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UsageInfo,
)
from services.protocol import AdapterInfo, AdapterUpdate, LoadAdapterRequest, ModelInfo, UnloadAdapterRequest

T = TypeVar("T")

def error_response(error: RequestError) -> ErrorResponse:
    return ErrorResponse.model_validate(openai_error(error))


def sse(data: str) -> str:
    return f"data: {data}\n\n"


async def started(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first item (errors before it raise here), then replay it and the rest."""
    try:
        first = await anext(source)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await source.aclose()
        raise

    async def replay() -> AsyncIterator[T]:
        async with aclosing(source):
            if first is not None:
                yield first
            async for item in source:
                yield item

    return replay()


async def merged(sources: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index (vLLM's
    merge_async_iterators). Leaving early cancels every stream, which aborts its engine request."""
    if len(sources) == 1:
        async with aclosing(sources[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, source: AsyncIterator[T]) -> None:
        try:
            async with aclosing(source):
                async for item in source:
                    await queue.put((index, item))
            await queue.put((index, done))
        except Exception as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sources)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    """One per PromptService worker, around that worker's `TextGeneration`."""

    def __init__(
        self,
        generation: TextGeneration,
        *,
        model_name: str,
        model_root: str | None = None,
        sampling_defaults: dict[str, Any] | None = None,
        parsing: ChatParsing | None = None,
        refresh_models: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.generation = generation
        # vLLM's tool and reasoning parsers, when configured (services/front/openai/parsing.py)
        self.parsing = parsing
        self.model_name = model_name
        self.model_root = model_root
        # what a request leaves unset: the model's generation_config.json first (services/model_store.py)
        self.sampling_defaults = sampling_defaults or {}
        self.strings = TokenStrings(generation.tokenizer)
        # the LoRA adapters the GPU tier serves, as its /model_info last said (`use_engine`), and
        # how to ask it again (a name not known here may have been loaded through another worker)
        self.adapters: dict[str, AdapterInfo] = {}
        self.refresh_models = refresh_models

    def use_engine(self, info: ModelInfo) -> None:
        self.adapters = {adapter.name: adapter for adapter in info.adapters}

    # --- shared checks -----------------------------------------------------------------------

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter `model` names, None for the base model; 404 for a name not served."""
        if not model or model == self.model_name:
            return None
        if model in self.adapters:
            return model
        raise self.unknown_model(model)

    def unknown_model(self, model: str) -> RequestError:
        return RequestError(
            f"The model `{model}` does not exist. Valid aliases: {self.model_name}.", param="model", status=404
        )

    async def adapter_for(self, model: str | None) -> str | None:
        """`check_model`, asking the GPU tier again before a 404 when adapters may change at run
        time (loaded through another front worker). A generation request only: the base model and
        known adapters cost no call."""
        try:
            return self.check_model(model)
        except RequestError:
            if self.refresh_models is None:
                raise
        await self.refresh_models()
        return self.check_model(model)

    async def stream_started(self, adapter: str | None, streams: AsyncIterator[T]) -> AsyncIterator[T]:
        """`started`, where the GPU tier's 404 for an adapter unloaded since `check_model` looks
        like vLLM's answer for an unknown model."""
        try:
            return await started(streams)
        except RequestError as error:
            if adapter is None or error.status != 404:
                raise
            if self.refresh_models is not None:
                await self.refresh_models()
            raise self.unknown_model(adapter) from error

    def max_tokens(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        """vLLM's rule: clamp to what the context leaves; refuse only what can never fit."""
        context = self.generation.context_length
        if requested is not None and requested > context:
            raise RequestError(
                f"{param}={requested} cannot be greater than max_model_len={context}. "
                f"Please request fewer output tokens. (parameter={param}, value={requested})",
                param=param,
            )
        if prompt_tokens > context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, your prompt contains "
                f"{prompt_tokens} input tokens, which exceeds this limit even without any output tokens. "
                f"Please reduce the length of the input prompt. (parameter=input_tokens, value={prompt_tokens})",
                param="input_tokens",
            )
        max_tokens = context - prompt_tokens if requested is None else min(requested, context - prompt_tokens)
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}.", param=param)
        return max_tokens

    def stop_reason(self, chunk: TextChunk, request: ChatCompletionRequest | CompletionRequest) -> int | str | None:
        """vLLM reports no stop_reason for the tokenizer's EOS. Our GPU tier has no tokenizer, so
        its engine takes EOS from generation_config.json as a stop token id and names it."""
        eos = self.generation.tokenizer.eos_token_id
        if chunk.stop_reason == eos and eos not in (request.stop_token_ids or []):
            return None
        return chunk.stop_reason

    @staticmethod
    def options(request: ChatCompletionRequest | CompletionRequest, parsed: ParsedChat | None = None) -> TextOptions:
        return TextOptions(
            stop=request.stop_strings(),
            include_stop_str_in_output=request.include_stop_str_in_output,
            # a tool parser may need the special tokens its calls are marked with (hermes)
            skip_special_tokens=parsed.skip_special_tokens if parsed is not None else request.skip_special_tokens,
        )

    @staticmethod
    def grammar(request: ChatCompletionRequest | CompletionRequest, parsed: ParsedChat | None = None) -> Any:
        """The structured-output constraint for the engine: the request's, or the one the tool
        parser chose (a schema for required / named tool choice)."""
        try:
            return parsed.grammar() if parsed is not None else request.grammar()
        except (ProtocolError, ValueError) as error:
            raise RequestError(getattr(error, "message", str(error)), param=getattr(error, "param", None) or "structured_outputs") from error

    # --- /v1/models, /tokenize, /detokenize ----------------------------------------------------

    async def models(self) -> ModelList:
        """The base model, then each adapter with the base as its parent (vLLM's cards). When
        adapters change at run time, asked of the GPU tier each time (another front worker may
        have taken the load)."""
        if self.refresh_models is not None:
            await self.refresh_models()
        base = ModelCard(id=self.model_name, max_model_len=self.generation.context_length, root=self.model_root,
                         permission=[ModelPermission()])
        adapters = [ModelCard(id=a.name, root=a.path, parent=a.parent, permission=[ModelPermission()])
                    for a in self.adapters.values()]
        return ModelList(data=[base, *adapters])

    async def update_adapter(self, request: LoadAdapterRequest | UnloadAdapterRequest) -> AdapterUpdate:
        """Load or unload a LoRA adapter on the GPU tier, then take its new list of adapters."""
        update = await self.generation.llm.update_adapter(request)
        if self.refresh_models is not None:
            await self.refresh_models()
        return update

    def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.check_model(request.model)
        if isinstance(request, TokenizeChatRequest):
            ids = self.generation.chat_prompt(
                [m.for_template() for m in request.messages],
                add_special_tokens=request.add_special_tokens,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                template_kwargs=request.chat_template_kwargs,
            )
        else:
            ids = self.generation.text_prompt(request.prompt, add_special_tokens=request.add_special_tokens)
        strs = self.generation.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.generation.context_length, token_strs=strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        if request.tokens:
            self.generation.token_prompt(request.tokens, param="tokens")
        return DetokenizeResponse(prompt=self.generation.tokenizer.decode(request.tokens))

    # --- /v1/chat/completions ----------------------------------------------------------------------

    async def chat(
        self, request: ChatCompletionRequest, request_id: str | None = None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        adapter = await self.adapter_for(request.model)
        parsing = self.parsing
        check_tool_choice(request, parsing is not None and parsing.tool_parsing)
        parsed = parsing.start(request) if parsing is not None and parsing.wants(request) else None
        messages = [m.for_template() for m in request.messages]
        template_options = request.template_options()
        if request.tools:  # rendered whatever the tool choice, as vLLM does
            template_options["template_kwargs"]["tools"] = [tool.for_template() for tool in request.tools]
        ids = self.generation.chat_prompt(messages, add_special_tokens=request.add_special_tokens, **template_options)
        if not ids:
            raise RequestError("The conversation renders to an empty prompt.", param="messages")
        requested, param = request.requested_max_tokens()
        params = self.generation.sampling_params(
            len(ids),
            self.max_tokens(len(ids), requested, param),
            **request.sampling_fields(self.sampling_defaults),
            logprobs=request.top_logprobs if request.logprobs else None,
            structured_outputs=self.grammar(request, parsed),
        )
        self.generation.admit(params.n)
        role = "assistant" if request.add_generation_prompt else (messages[-1]["role"] if messages else "assistant")
        echo = ""
        if request.echo and messages and messages[-1]["role"] == role:
            echo = messages[-1]["content"]
        response_id = f"chatcmpl-{request_id or request.request_id}"
        source = await self.stream_started(adapter, self.generation.stream(ids, params, self.options(request, parsed), adapter=adapter))
        if request.stream:
            return self._chat_stream(request, source, response_id, role, echo, ids, parsed)
        return await self._chat_full(request, source, response_id, role, echo, ids, parsed)

    async def _chat_full(
        self, request: ChatCompletionRequest, source: AsyncIterator[TextChunk], response_id: str,
        role: str, echo: str, prompt_ids: list[int], parsed: ParsedChat | None = None,
    ) -> ChatCompletionResponse:
        n = request.n or 1
        texts, token_ids = [""] * n, [[] for _ in range(n)]
        builders = [LogprobsBuilder(self.strings) for _ in range(n)]
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
                    stop_reason=self.stop_reason(finished[i], request) if finished[i] else None,
                    token_ids=token_ids[i] if request.return_token_ids else None,
                )
            )
        completion_tokens = sum(f.completion_tokens for f in finished if f)
        return ChatCompletionResponse(
            id=response_id,
            model=request.model or self.model_name,
            choices=choices,
            usage=UsageInfo(
                prompt_tokens=len(prompt_ids),
                completion_tokens=completion_tokens,
                total_tokens=len(prompt_ids) + completion_tokens,
            ),
            prompt_token_ids=prompt_ids if request.return_token_ids else None,
        )

    async def _chat_stream(
        self, request: ChatCompletionRequest, source: AsyncIterator[TextChunk], response_id: str,
        role: str, echo: str, prompt_ids: list[int], parsed: ParsedChat | None = None,
    ) -> AsyncIterator[str]:
        n = request.n or 1
        streams = [parsed.stream(prompt_ids) for _ in range(n)] if parsed is not None else None
        created = int(time.time())
        prompt_tokens = len(prompt_ids)
        builders = [LogprobsBuilder(self.strings) for _ in range(n)]
        tokens_so_far = [0] * n
        finish_sent = [False] * n

        def chunk_json(choice: ChatCompletionResponseStreamChoice, completion_tokens: int | None = None, **extra: Any) -> str:
            response = ChatCompletionStreamResponse(
                id=response_id, object="chat.completion.chunk", created=created, model=request.model or self.model_name,
                choices=[choice], **extra,
            )
            if request.continuous_usage and completion_tokens is not None:
                response.usage = UsageInfo(
                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens,
                )
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
                        fields["stop_reason"] = self.stop_reason(chunk, request)
                        finish_sent[i] = True
                    yield chunk_json(ChatCompletionResponseStreamChoice(**fields), tokens_so_far[i])
            if request.include_usage:
                completion_tokens = sum(tokens_so_far)
                usage = ChatCompletionStreamResponse(
                    id=response_id, object="chat.completion.chunk", created=created, model=request.model or self.model_name, choices=[],
                    usage=UsageInfo(
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens,
                    ),
                )
                yield sse(usage.model_dump_json(exclude_unset=True, exclude_none=True))
        except RequestError as error:
            yield sse(error_response(error).model_dump_json())
        yield sse("[DONE]")

    # --- /v1/completions -------------------------------------------------------------------------------

    async def completion(
        self, request: CompletionRequest, request_id: str | None = None
    ) -> CompletionResponse | AsyncIterator[str]:
        adapter = await self.adapter_for(request.model)
        assert request.max_tokens is not None
        prompts: list[tuple[list[int], str]] = []  # token ids, and the text echo shows
        for prompt in request.prompts():
            if isinstance(prompt, str):
                prompts.append((self.generation.text_prompt(prompt, add_special_tokens=request.add_special_tokens), prompt))
            else:
                ids = self.generation.token_prompt(prompt, param="prompt")
                prompts.append((ids, self.generation.tokenizer.decode(ids) if request.echo else ""))
        echo_only = bool(request.echo) and request.max_tokens == 0
        self.generation.admit(len(prompts) * (request.n or 1))
        grammar = self.grammar(request)
        sources = []
        for ids, _ in prompts:
            max_tokens = 1 if echo_only else self.max_tokens(len(ids), request.max_tokens, "max_tokens")
            params = self.generation.sampling_params(
                len(ids), max_tokens, **request.sampling_fields(self.sampling_defaults), logprobs=request.logprobs,
                structured_outputs=grammar,
            )
            sources.append(self.generation.stream(ids, params, self.options(request), adapter=adapter))
        response_id = f"cmpl-{request_id or request.request_id}"
        source = await self.stream_started(adapter, merged(sources))
        if request.stream:
            return self._completion_stream(request, source, response_id, prompts, echo_only)
        return await self._completion_full(request, source, response_id, prompts, echo_only)

    def _echoed(self, request: CompletionRequest, prompt: tuple[list[int], str], text: str, ids: list[int], echo_only: bool) -> tuple[str, list[int]]:
        prompt_ids, prompt_text = prompt
        if echo_only:
            return prompt_text, prompt_ids
        return prompt_text + text, prompt_ids + ids

    async def _completion_full(
        self, request: CompletionRequest, source: AsyncIterator[tuple[int, TextChunk]], response_id: str,
        prompts: list[tuple[list[int], str]], echo_only: bool,
    ) -> CompletionResponse:
        n = request.n or 1
        slots = len(prompts) * n
        texts, token_ids = [""] * slots, [[] for _ in range(slots)]
        builders = [LogprobsBuilder(self.strings) for _ in range(slots)]
        logprobs = [CompletionLogProbs() for _ in range(slots)]
        finished: list[TextChunk | None] = [None] * slots
        async with aclosing(source):
            async for p, chunk in source:
                k = p * n + chunk.index
                texts[k] += chunk.text
                token_ids[k] += chunk.token_ids
                if request.logprobs is not None and chunk.logprobs:
                    part = builders[k].completion(chunk.token_ids, chunk.logprobs, request.logprobs)
                    for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                        getattr(logprobs[k], name).extend(getattr(part, name))
                if chunk.finish_reason is not None:
                    finished[k] = chunk
        choices = []
        for k in range(slots):
            text, ids = texts[k], token_ids[k]
            if request.echo:
                text, _ = self._echoed(request, prompts[k // n], text, ids, echo_only)
            choices.append(
                CompletionResponseChoice(
                    index=k,
                    text=text,
                    logprobs=logprobs[k] if request.logprobs is not None else None,
                    finish_reason=finished[k].finish_reason if finished[k] else None,
                    stop_reason=self.stop_reason(finished[k], request) if finished[k] else None,
                    token_ids=token_ids[k] if request.return_token_ids else None,
                    prompt_token_ids=prompts[k // n][0] if request.return_token_ids else None,
                )
            )
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        completion_tokens = sum(f.completion_tokens for f in finished if f)
        return CompletionResponse(
            id=response_id,
            model=request.model or self.model_name,
            choices=choices,
            usage=UsageInfo(
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    async def _completion_stream(
        self, request: CompletionRequest, source: AsyncIterator[tuple[int, TextChunk]], response_id: str,
        prompts: list[tuple[list[int], str]], echo_only: bool,
    ) -> AsyncIterator[str]:
        n = request.n or 1
        slots = len(prompts) * n
        created = int(time.time())
        builders = [LogprobsBuilder(self.strings) for _ in range(slots)]
        tokens_so_far = [0] * slots
        echoed = [False] * slots
        try:
            async with aclosing(source):
                async for p, chunk in source:
                    k = p * n + chunk.index
                    text, ids = chunk.text, list(chunk.token_ids)
                    prompt_ids = None
                    if request.echo and not echoed[k]:
                        text, ids = self._echoed(request, prompts[p], text, ids, echo_only)
                        echoed[k] = True
                        prompt_ids = prompts[p][0] if request.return_token_ids else None
                    elif request.echo and echo_only:
                        text, ids = "", []
                    elif not text and not ids and not tokens_so_far[k] and chunk.finish_reason is None:
                        continue
                    elif request.return_token_ids and not echoed[k]:
                        prompt_ids, echoed[k] = prompts[p][0], True
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = builders[k].completion(chunk.token_ids, chunk.logprobs or [], request.logprobs)
                    tokens_so_far[k] = chunk.completion_tokens
                    response = CompletionStreamResponse(
                        id=response_id, object="text_completion", created=created, model=request.model or self.model_name,
                        choices=[
                            CompletionResponseStreamChoice(
                                index=k, text=text, logprobs=logprobs,
                                finish_reason=chunk.finish_reason, stop_reason=self.stop_reason(chunk, request),
                                prompt_token_ids=prompt_ids,
                                token_ids=list(chunk.token_ids) if request.return_token_ids else None,
                            )
                        ],
                    )
                    if request.continuous_usage:
                        prompt_tokens = len(prompts[p][0])
                        response.usage = UsageInfo(
                            prompt_tokens=prompt_tokens, completion_tokens=tokens_so_far[k],
                            total_tokens=prompt_tokens + tokens_so_far[k],
                        )
                    yield sse(response.model_dump_json(exclude_unset=True))
            if request.include_usage:
                prompt_tokens = sum(len(ids) for ids, _ in prompts)
                completion_tokens = sum(tokens_so_far)
                usage = CompletionStreamResponse(
                    id=response_id, created=created, model=request.model or self.model_name, choices=[],
                    usage=UsageInfo(
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens,
                    ),
                )
                yield sse(usage.model_dump_json(exclude_unset=False, exclude_none=True))
        except RequestError as error:
            yield sse(error_response(error).model_dump_json())
        yield sse("[DONE]")
