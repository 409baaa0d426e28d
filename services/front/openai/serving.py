"""What the OpenAI handlers share: one `OpenAIServing` per PromptService worker, and the SSE helpers.

`OpenAIServing` holds the worker's `TextGeneration`, the model and its adapters, and the checks
both generation routes make (vLLM's max_tokens rule, the stop reason, the grammar); it serves
/v1/models, /tokenize and /detokenize itself. serving_chat.py and serving_completion.py handle the
two generation routes with it. Behaviour follows vLLM's server (docs/architecture.md, "The OpenAI API").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from services.errors import RequestError, openai_error
from services.front.generation import TextChunk, TextGeneration, TextOptions
from services.front.openai.logprobs import TokenStrings
from services.front.openai.parsing import ChatParsing, ParsedChat
from services.front.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionStreamResponse,
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


def usage_info(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def usage_chunk(response_type: type[ChatCompletionStreamResponse] | type[CompletionStreamResponse], response_id: str,
                created: int, model: str, prompt_tokens: int, completion_tokens: int) -> str:
    """A stream's last chunk before `[DONE]` when `stream_options.include_usage` asks for it: no
    choice, the whole request's usage."""
    chunk = response_type(id=response_id, created=created, model=model, choices=[],
                          usage=usage_info(prompt_tokens, completion_tokens))
    return sse(chunk.model_dump_json(exclude_none=True))


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
