"""Logprobs in OpenAI's shapes, ordered and cut as vLLM's server does, with vLLM's token strings."""

from __future__ import annotations

import pytest

from services.front.openai.logprobs import LogprobsBuilder, TokenStrings
from services.front.openai.protocol import CompletionResponseStreamChoice
from services.protocol import TokenLogprobs

THE, CAPITAL = 504, 3575  # "The", " capital"


@pytest.fixture(scope="module")
def strings(tokenizer):
    return TokenStrings(tokenizer)


def position(sampled: float, *top: tuple[int, float]) -> TokenLogprobs:
    return TokenLogprobs(logprob=sampled, top=list(top))


def test_sampled_token_comes_first_then_the_rest_by_rank(strings):
    """A sampled token outside the top-k leads, as in vLLM's logprob dicts; chat keeps top_logprobs
    entries, completions keep logprobs + 1."""
    lp = [position(-3.0, (7, -1.0), (9, -2.0))]  # sampled CAPITAL is not in the top 2
    chat = LogprobsBuilder(strings).chat([CAPITAL], lp, top=2).content[0]
    assert chat.token == " capital" and chat.logprob == -3.0
    assert [t.logprob for t in chat.top_logprobs] == [-3.0, -1.0]
    completion = LogprobsBuilder(strings).completion([CAPITAL], lp, top=2)
    assert list(completion.top_logprobs[0].values()) == [-3.0, -1.0, -2.0]


def test_a_sampled_token_in_the_top_k_is_not_repeated(strings):
    lp = [position(-0.5, (THE, -0.5), (7, -1.0))]
    chat = LogprobsBuilder(strings).chat([THE], lp, top=2).content[0]
    assert [t.token for t in chat.top_logprobs][0] == "The" and len(chat.top_logprobs) == 2
    assert len({t.token for t in chat.top_logprobs}) == 2


def test_minus_infinity_becomes_openais_floor(strings):
    chat = LogprobsBuilder(strings).chat([THE], [position(float("-inf"))], top=0).content[0]
    assert chat.logprob == -9999.0 and chat.top_logprobs == []


def test_text_offsets_run_on_across_chunks(strings):
    builder = LogprobsBuilder(strings)
    first = builder.completion([THE], [position(-0.1)], top=0)
    second = builder.completion([CAPITAL], [position(-0.2)], top=0)
    assert (first.text_offset, second.text_offset) == ([0], [3])


def test_characters_split_over_tokens_are_completed_from_context(tokenizer, strings):
    """Byte-level pieces of one character show as '' until the token that completes it."""
    ids = tokenizer.encode("世界 🎉")
    shown = [strings.one(token, ids[:i]) for i, token in enumerate(ids)]
    assert "".join(shown) == "世界 🎉"
    assert "\ufffd" not in "".join(shown)


def test_stream_chunks_keep_every_completion_field(strings):
    """Chunks are dumped with exclude_unset (vLLM's way): the logprobs fields must still be there."""
    logprobs = LogprobsBuilder(strings).completion([THE], [position(-0.1, (THE, -0.1))], top=1)
    dumped = CompletionResponseStreamChoice(index=0, text="The", logprobs=logprobs).model_dump(exclude_unset=True)
    assert dumped["logprobs"] == {"text_offset": [0], "token_logprobs": [-0.1], "tokens": ["The"], "top_logprobs": [{"The": -0.1}]}
