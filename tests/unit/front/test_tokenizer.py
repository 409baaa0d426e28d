"""Tokenization and the limits the front tier enforces."""

import pytest

from services.errors import RequestError
from services.front.text.tokenizer import check_context_length, check_token_ids, encode


def test_fast_tokenizer_matches_the_tokenizers_library(tokenizer, model_path):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(f"{model_path}/tokenizer.json")
    text = "Héllo 世界 🎉 done"
    assert encode(tokenizer, text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids


def test_rendered_chat_prompt_keeps_its_special_tokens(tokenizer):
    ids = encode(tokenizer, "<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_over_the_context_length_names_every_number():
    with pytest.raises(RequestError) as refused:
        check_context_length(prompt_tokens=2000, max_tokens=100, context_length=2048)
    assert refused.value.status == 400
    for number in ("2048", "2100", "2000", "100"):
        assert number in refused.value.message


def test_exactly_the_context_length_is_allowed():
    check_context_length(prompt_tokens=2000, max_tokens=48, context_length=2048)


@pytest.mark.parametrize("ids", [[], [-1], [49152], [1, 2, 10**9]])
def test_token_ids_outside_the_vocabulary_are_refused(ids):
    with pytest.raises(RequestError, match="tokens"):
        check_token_ids(ids, 49152, param="tokens")
