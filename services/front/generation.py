"""The front tier's generation path: text in, token ids to the GPU tier, text out.

One `TextGeneration` per PromptService worker. Every API (/generate and the OpenAI routes) goes
through it, so templating, limits, detokenization and stop strings behave the same everywhere:

    prompt or messages -> template -> token ids -> limits -> LLMService -> ids -> text chunks
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from services.errors import RequestError
from services.front.inflight import InflightRequest
from services.front.llm_client import LLMClient
from services.front.metrics import front_metrics
from services.front.text.detokenizer import IncrementalDetokenizer
from services.front.text.templates import ChatFormatter
from services.front.text.tokenizer import check_context_length, check_token_ids, encode
from services.protocol import FinishReason, GenerateRequest, ModelInfo, SamplingParams, TokenLogprobs


@dataclass
class TextOptions:
    """What the front tier does with the returned tokens (vLLM's names and defaults)."""

    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


@dataclass
class TextChunk:
    """New text of one choice. The last chunk of a choice carries its finish reason and counts."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TextGeneration:
    def __init__(
        self,
        *,
        tokenizer: Any,
        formatter: ChatFormatter,
        llm: LLMClient,
        context_length: int,
        vocab_size: int,
        default_max_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.llm = llm
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.default_max_tokens = default_max_tokens
        self.eos_stop_token_ids: list[int] = []  # EOS ids the engine would not stop on by itself

    def use_engine(self, info: ModelInfo) -> None:
        """Take the engine's own limits (it derives its context length from the setting, rope
        scaling and sliding windows) once the GPU tier is ready, so the tiers cannot disagree; and
        when the engine, which has no tokenizer, does not know the tokenizer's EOS (it reads only
        generation_config.json), ask it to stop there too."""
        self.context_length = info.max_model_len
        self.vocab_size = info.vocab_size
        eos = self.tokenizer.eos_token_id
        self.eos_stop_token_ids = [eos] if eos is not None and eos not in info.eos_token_ids else []

    def admit(self, sequences: int) -> None:
        """Charge the current request the engine sequences it is about to start (services/front/inflight.py)."""
        InflightRequest.current().admit(sequences)

    # --- prompts -> token ids ----------------------------------------------------------------

    def chat_prompt(
        self, messages: list[dict[str, Any]], *, add_special_tokens: bool = False, **template_options: Any
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template (which holds its own
        special tokens, hence no BOS unless asked for, as in vLLM)."""
        started = time.perf_counter()
        try:
            text = self.formatter.render(messages, **template_options)
        except Exception as error:  # a template may raise on input it does not accept
            raise RequestError(f"the chat template could not render these messages: {error}", param="messages") from error
        ids = encode(self.tokenizer, text, add_special_tokens=add_special_tokens)
        front_metrics().prompt_processing.labels("chat").observe(time.perf_counter() - started)
        return ids

    def text_prompt(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a raw prompt, with the tokenizer's own special tokens (BOS) by default."""
        started = time.perf_counter()
        ids = encode(self.tokenizer, text, add_special_tokens=add_special_tokens)
        front_metrics().prompt_processing.labels("text").observe(time.perf_counter() - started)
        return ids

    def token_prompt(self, token_ids: list[int], *, param: str = "tokens") -> list[int]:
        check_token_ids(token_ids, self.vocab_size, param=param)
        return token_ids

    def sampling_params(self, prompt_tokens: int, max_tokens: int | None, **fields: Any) -> SamplingParams:
        """Sampling parameters with max_tokens defaulted to what fits, and the context limit checked."""
        if max_tokens is None:
            max_tokens = max(1, min(self.default_max_tokens, self.context_length - prompt_tokens))
        check_context_length(prompt_tokens, max_tokens, self.context_length)
        if fields.get("stop_token_ids"):
            check_token_ids(fields["stop_token_ids"], self.vocab_size, param="stop_token_ids")
        if self.eos_stop_token_ids and not fields.get("ignore_eos"):
            given = fields.get("stop_token_ids") or []
            fields["stop_token_ids"] = [*given, *(eos for eos in self.eos_stop_token_ids if eos not in given)]
        try:
            return SamplingParams(max_tokens=max_tokens, **fields)
        except ValueError as error:
            raise RequestError(str(error)) from error

    # --- token ids -> text -----------------------------------------------------------------------

    async def stream(
        self, token_ids: list[int], params: SamplingParams, options: TextOptions = TextOptions(),
        adapter: str | None = None,
    ) -> AsyncIterator[TextChunk]:
        """Text chunks of every choice as the engine produces them, ending each with its finish;
        `adapter` names the LoRA adapter to run with (None: the base model)."""
        request = GenerateRequest(request_id=uuid.uuid4().hex, token_ids=token_ids, sampling_params=params,
                                  adapter=adapter)
        decoders = [
            IncrementalDetokenizer(
                self.tokenizer.backend_tokenizer,
                stop=options.stop,
                include_stop_str_in_output=options.include_stop_str_in_output,
                skip_special_tokens=options.skip_special_tokens,
                min_tokens=params.min_tokens,
            )
            for _ in range(params.n)
        ]
        open_choices = set(range(params.n))
        metrics = front_metrics()
        metrics.prompt_tokens.inc(len(token_ids))
        sent = first = last = time.perf_counter()
        completion_tokens = first_tokens = 0
        try:
            async with aclosing(self._chunks(request, decoders, open_choices, options)) as chunks:
                async for chunk in chunks:
                    if chunk.token_ids:
                        last = time.perf_counter()
                        if completion_tokens == 0:
                            first, first_tokens = last, len(chunk.token_ids)
                            metrics.time_to_first_token.observe(first - sent)
                        completion_tokens += len(chunk.token_ids)
                    yield chunk
        finally:
            metrics.completion_tokens.inc(completion_tokens)
            if adapter is not None:
                metrics.count_adapter_request(adapter, len(token_ids), completion_tokens)
            if completion_tokens > first_tokens:
                metrics.time_per_output_token.observe((last - first) / (completion_tokens - first_tokens))

    async def _chunks(
        self, request: GenerateRequest, decoders: list[IncrementalDetokenizer], open_choices: set[int],
        options: TextOptions,
    ) -> AsyncIterator[TextChunk]:
        async with aclosing(InflightRequest.current().stream(self.llm, request)) as deltas:
            async for delta in deltas:
                if delta.index not in open_choices:
                    continue  # a choice already ended by a stop string
                decoder = decoders[delta.index]
                ids = delta.token_ids
                if delta.finish_reason == "stop" and ids and not options.include_stop_str_in_output:
                    ids = ids[:-1]  # the stop token itself is not text (as in vLLM)
                text = decoder.push(ids)
                chunk = TextChunk(
                    index=delta.index,
                    text=text,
                    token_ids=delta.token_ids,
                    logprobs=delta.logprobs,
                    prompt_tokens=delta.prompt_tokens,
                    completion_tokens=delta.completion_tokens,
                )
                if decoder.stop_reason is not None:
                    # The tokens after the one that completed the stop string are not part of it.
                    used = decoder.token_count - (delta.completion_tokens - len(delta.token_ids))
                    chunk.token_ids = delta.token_ids[:used]
                    chunk.logprobs = delta.logprobs[:used] if delta.logprobs else delta.logprobs
                    chunk.completion_tokens = decoder.token_count
                    chunk.finish_reason, chunk.stop_reason = "stop", decoder.stop_reason
                elif delta.finish_reason is not None:
                    chunk.text += decoder.finish()
                    chunk.finish_reason, chunk.stop_reason = delta.finish_reason, delta.stop_reason
                if chunk.finish_reason is not None:
                    open_choices.discard(delta.index)
                yield chunk
                if not open_choices:
                    break  # leaving the stream aborts whatever the engine still runs
