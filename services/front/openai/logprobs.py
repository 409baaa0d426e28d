"""Logprobs in OpenAI's two shapes (chat and completion), with the token strings vLLM's server shows.

The GPU tier sends each output token's logprob and its top alternatives, best first; a position's
entries are cut as vLLM cuts them (the sampled token, then the top-k), and each id is decoded
alone as vLLM decodes it (docs/architecture.md, "The OpenAI API").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from services.front.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
)
from services.protocol import TokenLogprobs

REPLACEMENT = "\N{REPLACEMENT CHARACTER}"


def _floor(logprob: float) -> float:
    return max(logprob, -9999.0)  # OpenAI's stand-in for -inf


class TokenStrings:
    """Decodes single token ids the way vLLM's logprobs do."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.marker = _leading_space_marker(tokenizer)

    def one(self, token_id: int, context: Sequence[int]) -> str:
        text = self.tokenizer.decode([token_id]) or ""
        if self.marker is not None:
            raw = self.tokenizer.convert_ids_to_tokens([token_id])[0] or ""
            markers = len(raw) - len(raw.lstrip(self.marker))
            missing = markers - (len(text) - len(text.lstrip(" ")))
            if missing > 0:
                text = " " * missing + text
        if text.endswith(REPLACEMENT):
            text = self._complete(token_id, list(context)[-4:])
        return text

    def _complete(self, token_id: int, context: list[int]) -> str:
        """vLLM's `_correct_decoded_token`: the text this token completes, or ''."""
        decode = self.tokenizer.decode
        for count in range(1, len(context) + 1):
            window = context[-count:]
            full = decode(window + [token_id])
            if full.endswith(REPLACEMENT):
                continue
            clean_end = len(window)
            for j in range(len(window) - 1, -1, -1):
                if decode([window[j]]).endswith(REPLACEMENT):
                    clean_end = j
                else:
                    break
            prefix = decode(window[:clean_end]) if clean_end > 0 else ""
            if full.startswith(prefix):
                return full[len(prefix):]
            common = 0
            for a, b in zip(prefix, full):
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""


def _leading_space_marker(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    except Exception:
        return None
    for candidate in [pre, *pre.get("pretokenizers", [])]:
        if candidate.get("type") == "Metaspace":
            return candidate.get("replacement", "\u2581")
    return None


def _entries(token_id: int, position: TokenLogprobs) -> list[tuple[int, float]]:
    """vLLM's order: the sampled token first, then the top-k without it."""
    return [(token_id, position.logprob)] + [(t, lp) for t, lp in position.top if t != token_id]


class LogprobsBuilder:
    """Builds one choice's logprobs across stream chunks (it keeps the sampled-token context)."""

    def __init__(self, strings: TokenStrings) -> None:
        self.strings = strings
        self.context: list[int] = []
        self.next_offset = 0

    def _token(self, token_id: int) -> str:
        return self.strings.one(token_id, self.context)

    def chat(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], top: int) -> ChatCompletionLogProbs:
        content = []
        for token_id, position in zip(token_ids, logprobs):
            entries = _entries(token_id, position)
            tops = []
            for i, (candidate, logprob) in enumerate(entries):
                if i >= top:
                    break
                text = self._token(candidate)
                tops.append(ChatCompletionLogProb(token=text, logprob=_floor(logprob), bytes=list(text.encode("utf-8", errors="replace"))))
            text = self._token(token_id)
            content.append(
                ChatCompletionLogProbsContent(
                    token=text,
                    logprob=_floor(position.logprob),
                    bytes=list(text.encode("utf-8", errors="replace")),
                    top_logprobs=tops,
                )
            )
            self.context.append(token_id)
        return ChatCompletionLogProbs(content=content)

    def completion(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], top: int) -> CompletionLogProbs:
        offsets: list[int] = []
        values: list[float | None] = []
        tokens: list[str] = []
        top_logprobs: list[dict[str, float] | None] = []
        for token_id, position in zip(token_ids, logprobs):
            text = self._token(token_id)
            tops: dict[str, float] = {}
            for i, (candidate, logprob) in enumerate(_entries(token_id, position)):
                if i > top:  # OpenAI's completions give top + 1 entries
                    break
                tops[self._token(candidate)] = _floor(logprob)
            tokens.append(text)
            values.append(_floor(position.logprob))
            top_logprobs.append(tops)
            offsets.append(self.next_offset)
            self.next_offset += len(text)
            self.context.append(token_id)
        # Fields given explicitly: stream chunks are dumped with exclude_unset, as in vLLM.
        return CompletionLogProbs(text_offset=offsets, token_logprobs=values, tokens=tokens, top_logprobs=top_logprobs)
