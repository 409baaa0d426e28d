"""What the OpenAI handlers share (services/front/openai/serving.py): the usage chunk that ends a
stream, one helper for chat and completion."""

from __future__ import annotations

import json

import pytest

from services.front.openai.protocol import ChatCompletionStreamResponse, CompletionStreamResponse
from services.front.openai.serving import usage_chunk


@pytest.mark.parametrize("kind, name", [(ChatCompletionStreamResponse, "chat.completion.chunk"),
                                        (CompletionStreamResponse, "text_completion")])
def test_a_usage_chunk_has_no_choice_and_the_whole_usage(kind, name):
    line = usage_chunk(kind, "id-1", 5, "m", 3, 4)
    assert line.startswith("data: ") and line.endswith("\n\n")
    assert json.loads(line.removeprefix("data: ")) == {
        "id": "id-1", "object": name, "created": 5, "model": "m", "choices": [],
        "usage": {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4},
    }
