"""The engine gets the sampling parameters vLLM's own server would give it for the same request.

A chat request goes through the front tier's schema (`sampling_fields`), the contract
(`protocol.SamplingParams`) and the GPU tier's `vllm_sampling_params` (engine_io.py); vLLM's own OpenAI schema builds
its `SamplingParams` from the same body. Every field must agree except those the split changes on
purpose: the GPU tier does not detokenize, and always streams deltas to the front. That includes
the defaults a model's generation_config.json sets, which `vllm serve` applies to unset fields.
"""

from __future__ import annotations

import json
import shutil

import pytest

from services.front.openai.protocol import ChatCompletionRequest
from services.gpu.engine_io import vllm_sampling_params
from services.model_store import sampling_defaults
from services.protocol import GenerateRequest, SamplingParams

SPLIT_ON_PURPOSE = {"detokenize", "output_kind"}
USER = [{"role": "user", "content": "hi"}]


def fields(params) -> dict:
    return {
        name: getattr(params, name)
        for name in dir(params)
        if not name.startswith("_") and not callable(getattr(params, name)) and name not in SPLIT_ON_PURPOSE
    }


@pytest.mark.parametrize(
    "body",
    [
        # what `vllm bench serve` sends (docs/benchmarks.md)
        {"temperature": 0, "max_completion_tokens": 256, "ignore_eos": True, "stream": True},
        {"max_tokens": 20},
        {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7, "max_tokens": 32,
         "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1,
         "stop_token_ids": [2], "min_tokens": 3, "n": 2},
    ],
)  # fmt: skip
def test_engine_sampling_params_match_vllm_servers(body):
    assert_parity(body, model_defaults={})


def test_a_models_generation_config_sets_the_defaults_as_in_vllm(model_path, tmp_path):
    """A model that recommends its own sampling (as Llama 3 and Qwen do in generation_config.json)
    gets the defaults vLLM reads from it, and unset request fields take them."""
    from vllm.config import ModelConfig

    model = tmp_path / "model"
    shutil.copytree(model_path, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf"))
    config = json.loads((model / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05)
    (model / "generation_config.json").write_text(json.dumps(config))

    vllms = ModelConfig(model=str(model), skip_tokenizer_init=True).get_diff_sampling_param()
    defaults = sampling_defaults(str(model))
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05} == vllms
    assert sampling_defaults(model_path) == {}  # the default model sets none
    assert_parity({"max_tokens": 16}, model_defaults=defaults)  # all unset: the model's values
    assert_parity({"max_tokens": 16, "temperature": 0.0, "top_k": -1}, model_defaults=defaults)  # the request's win


def assert_parity(body: dict, model_defaults: dict) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

    body = {"model": "m", "messages": USER, **body}
    ours = ChatCompletionRequest.model_validate(body)
    max_tokens = ours.requested_max_tokens()[0]
    contract = SamplingParams(max_tokens=max_tokens, **ours.sampling_fields(model_defaults))
    engine = vllm_sampling_params(GenerateRequest(request_id="r", token_ids=[1, 2, 3], sampling_params=contract))

    theirs = VllmChatRequest.model_validate(body).to_sampling_params(max_tokens, dict(model_defaults))

    assert fields(engine) == fields(theirs)
