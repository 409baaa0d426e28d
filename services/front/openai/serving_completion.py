"""/v1/completions: one or several prompts (text or token ids) in, a completion or its SSE chunks out.

Each prompt runs as its own stream, `n` choices each, and `merged` interleaves them as they come;
choice k of prompt p is index p * n + k, as in vLLM. `echo` puts the prompt in front of its
choices (the prompt alone with max_tokens 0).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TypeVar

from services.errors import RequestError
from services.front.generation import TextChunk
from services.front.openai.logprobs import LogprobsBuilder
from services.front.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from services.front.openai.serving import OpenAIServing, error_response, sse, usage_chunk, usage_info

T = TypeVar("T")


async def create_completion(
    serving: OpenAIServing, request: CompletionRequest, request_id: str | None = None
) -> CompletionResponse | AsyncIterator[str]:
    """/v1/completions: the whole response, or its SSE chunks when `stream` is set."""
    adapter = await serving.adapter_for(request.model)
    assert request.max_tokens is not None
    prompts: list[tuple[list[int], str]] = []  # token ids, and the text echo shows
    for prompt in request.prompts():
        if isinstance(prompt, str):
            prompts.append((serving.generation.text_prompt(prompt, add_special_tokens=request.add_special_tokens), prompt))
        else:
            ids = serving.generation.token_prompt(prompt, param="prompt")
            prompts.append((ids, serving.generation.tokenizer.decode(ids) if request.echo else ""))
    echo_only = bool(request.echo) and request.max_tokens == 0
    serving.generation.admit(len(prompts) * (request.n or 1))
    grammar = serving.grammar(request)
    sources = []
    for ids, _ in prompts:
        max_tokens = 1 if echo_only else serving.max_tokens(len(ids), request.max_tokens, "max_tokens")
        params = serving.generation.sampling_params(
            len(ids), max_tokens, **request.sampling_fields(serving.sampling_defaults), logprobs=request.logprobs,
            structured_outputs=grammar,
        )
        sources.append(serving.generation.stream(ids, params, serving.options(request), adapter=adapter))
    response_id = f"cmpl-{request_id or request.request_id}"
    source = await serving.stream_started(adapter, merged(sources))
    if request.stream:
        return _completion_stream(serving, request, source, response_id, prompts, echo_only)
    return await _completion_full(serving, request, source, response_id, prompts, echo_only)


def _echoed(prompt: tuple[list[int], str], text: str, ids: list[int], echo_only: bool) -> tuple[str, list[int]]:
    """A choice's text and ids with its prompt in front (`echo`); the prompt alone for max_tokens 0."""
    prompt_ids, prompt_text = prompt
    if echo_only:
        return prompt_text, prompt_ids
    return prompt_text + text, prompt_ids + ids


async def _completion_full(
    serving: OpenAIServing, request: CompletionRequest, source: AsyncIterator[tuple[int, TextChunk]], response_id: str,
    prompts: list[tuple[list[int], str]], echo_only: bool,
) -> CompletionResponse:
    n = request.n or 1
    slots = len(prompts) * n
    texts, token_ids = [""] * slots, [[] for _ in range(slots)]
    builders = [LogprobsBuilder(serving.strings) for _ in range(slots)]
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
            text, _ = _echoed(prompts[k // n], text, ids, echo_only)
        choices.append(
            CompletionResponseChoice(
                index=k,
                text=text,
                logprobs=logprobs[k] if request.logprobs is not None else None,
                finish_reason=finished[k].finish_reason if finished[k] else None,
                stop_reason=serving.stop_reason(finished[k], request) if finished[k] else None,
                token_ids=token_ids[k] if request.return_token_ids else None,
                prompt_token_ids=prompts[k // n][0] if request.return_token_ids else None,
            )
        )
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    completion_tokens = sum(f.completion_tokens for f in finished if f)
    return CompletionResponse(
        id=response_id,
        model=request.model or serving.model_name,
        choices=choices,
        usage=usage_info(prompt_tokens, completion_tokens),
    )


async def _completion_stream(
    serving: OpenAIServing, request: CompletionRequest, source: AsyncIterator[tuple[int, TextChunk]], response_id: str,
    prompts: list[tuple[list[int], str]], echo_only: bool,
) -> AsyncIterator[str]:
    n = request.n or 1
    slots = len(prompts) * n
    created = int(time.time())
    builders = [LogprobsBuilder(serving.strings) for _ in range(slots)]
    tokens_so_far = [0] * slots
    echoed = [False] * slots
    try:
        async with aclosing(source):
            async for p, chunk in source:
                k = p * n + chunk.index
                text, ids = chunk.text, list(chunk.token_ids)
                prompt_ids = None
                if request.echo and not echoed[k]:
                    text, ids = _echoed(prompts[p], text, ids, echo_only)
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
                    id=response_id, object="text_completion", created=created, model=request.model or serving.model_name,
                    choices=[
                        CompletionResponseStreamChoice(
                            index=k, text=text, logprobs=logprobs,
                            finish_reason=chunk.finish_reason, stop_reason=serving.stop_reason(chunk, request),
                            prompt_token_ids=prompt_ids,
                            token_ids=list(chunk.token_ids) if request.return_token_ids else None,
                        )
                    ],
                )
                if request.continuous_usage:
                    prompt_tokens = len(prompts[p][0])
                    response.usage = usage_info(prompt_tokens, tokens_so_far[k])
                yield sse(response.model_dump_json(exclude_unset=True))
        if request.include_usage:
            yield usage_chunk(CompletionStreamResponse, response_id, created, request.model or serving.model_name,
                              sum(len(ids) for ids, _ in prompts), sum(tokens_so_far))
    except RequestError as error:
        yield sse(error_response(error).model_dump_json())
    yield sse("[DONE]")


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
