"""Loading the fast tokenizer, encoding prompts, and the context-length limit.

transformers (and the torch it imports) is imported only when a tokenizer is loaded: every
process that loads the Bento imports this module, the GPU tier's too (docs/architecture.md,
"A replica's start").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.errors import RequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_path} has no fast tokenizer (tokenizer.json); the front tier needs one")
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool) -> list[int]:
    """Token ids of a prompt. Rendered chat templates already hold their special tokens."""
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_token_ids(token_ids: list[int], vocab_size: int, *, param: str) -> None:
    if not token_ids:
        raise RequestError(f"{param} must not be empty", param=param)
    bad = [token for token in token_ids if not 0 <= token < vocab_size]
    if bad:
        raise RequestError(
            f"{param} holds ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", param=param
        )


def check_context_length(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    """prompt + max_tokens must fit the model's context; the error names every number."""
    if prompt_tokens + max_tokens > context_length:
        raise RequestError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for max_tokens). Please shorten the prompt or lower max_tokens.",
            param="max_tokens" if prompt_tokens < context_length else "prompt",
        )
