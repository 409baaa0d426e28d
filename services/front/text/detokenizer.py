"""Token ids back to text, a few at a time, and stop strings (`IncrementalDetokenizer`).

`tokenizers`' DecodeStream holds back a character until all its tokens are in; on top of it this
module holds back just enough text to recognise a stop string still forming, and cuts the output
before it (after it, with `include_stop_str_in_output`). As in vLLM, a stop string counts only in
the text of the tokens after the first `min_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Feed token ids with `push`, take the text each call returns, and call `finish` at the end.

    The concatenation of everything returned equals the one-shot decode of all ids, cut at the
    first stop string, less a character left incomplete by the last token.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._hold_back = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._text = ""  # everything decoded so far
        self._sent = 0  # how much of it has been returned
        self._min_tokens = min_tokens
        # A stop string must end past this much text: the text of the first `min_tokens` tokens
        # (unknown, so no stop string counts, until then).
        self._stop_after: int | None = 0 if min_tokens == 0 else None
        self.stop_reason: str | None = None  # the stop string that ended the text, if one did

    @property
    def text(self) -> str:
        """All text returned so far."""
        return self._text[: self._sent]

    @property
    def token_count(self) -> int:
        """Tokens taken in; after a stop string, only those up to the one that completed it."""
        return len(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        """New text that is safe to show, possibly empty. Ids after a stop string are ignored."""
        if not self._stop:
            return self._step(token_ids)
        # With stop strings, one token at a time: the stop is found at the very token that
        # completed it, so the token count matches what the engine would report.
        pieces = []
        for token_id in token_ids:
            if self.stop_reason is not None:
                break
            pieces.append(self._step((token_id,)))
        return "".join(pieces)

    def _step(self, token_ids: Sequence[int]) -> str:
        if self.stop_reason is not None or not token_ids:
            return ""
        self._ids.extend(token_ids)
        chunk = self._stream.step(self._tokenizer, list(token_ids))
        if chunk:
            self._text += chunk
        if self._stop_after is None and len(self._ids) >= self._min_tokens:
            self._stop_after = len(self._text)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back when the stream ends."""
        if self.stop_reason is not None:
            return ""
        # DecodeStream holds back text that ends inside a character until the character is
        # complete. At the end, release what is complete; a character cut off by the end of the
        # generation (max_tokens) is dropped rather than shown as U+FFFD, as vLLM does.
        whole = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens).rstrip("\ufffd")
        if whole.startswith(self._text):
            self._text = whole
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self._stop and self._stop_after is not None and len(self._ids) > self._min_tokens:
            # Text already returned cannot hold a stop string: it was checked with the hold-back.
            found = [
                (i, s) for s in self._stop
                if (i := self._text.find(s, max(self._sent, self._stop_after - len(s) + 1))) != -1
            ]
            if found:
                position, stop = min(found)
                self.stop_reason = stop
                return self._take(position + len(stop) if self._include_stop else position)
        return self._take(len(self._text) if final else len(self._text) - self._hold_back)

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        piece = self._text[self._sent : end]
        self._sent = end
        return piece
