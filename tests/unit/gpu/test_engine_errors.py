"""How LLMService's /generate answers when its engine fails under a request, with no engine: a
stand-in engine client raises what vLLM's raises. An engine that died between the readiness
check and the stream is a 503 (the replica is restarting: the front answers "not ready", or
retries on another replica), never a 500, which the front reports as its own 502."""

from __future__ import annotations

import asyncio

import pytest
from bentoml.exceptions import InvalidArgument, ServiceUnavailable
from vllm.v1.engine.exceptions import EngineDeadError

from services.gpu.draining import Drain
from services.gpu.engine_clients import EngineLoad
from services.gpu.llm_service import LLMService, _input_errors
from services.protocol import GenerateRequest, ModelInfo, SamplingParams


class FailingEngine:
    """An engine client whose streams raise `error` before their first output."""

    errored = False  # its watch has not seen the death yet

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.aborted: list[str] = []

    async def generate(self, prompt, params, request_id, lora_request=None):
        raise self.error
        yield  # an async generator, as vLLM's

    async def abort(self, request_ids):
        self.aborted.extend(request_ids)


def llm_service_on(engine: FailingEngine):
    """LLMService's request path on `engine`, without starting a real one."""
    service = object.__new__(LLMService.inner)
    service.engine = engine
    service.engine_load = EngineLoad(None)
    service.drain = Drain(lambda: 0, timeout_s=1)
    service.input_errors = _input_errors()
    service.engine_dead_error = EngineDeadError
    service.adapters = None
    service.info = ModelInfo(model="m", max_model_len=64, vocab_size=100)
    return service


def generate(service, request_id: str = "r1") -> list[str]:
    request = GenerateRequest(request_id=request_id, token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=4))

    async def run() -> list[str]:
        return [frame async for frame in LLMService.inner.generate.func(service, request)]

    return asyncio.run(run())


def test_an_engine_that_died_under_the_request_is_a_503_and_counts_nothing():
    service = llm_service_on(FailingEngine(EngineDeadError()))
    with pytest.raises(ServiceUnavailable, match="the engine has stopped"):
        generate(service)
    assert service.engine_load.total() == 0


def test_a_request_the_engine_refuses_is_a_400():
    service = llm_service_on(FailingEngine(ValueError("bad grammar")))
    with pytest.raises(InvalidArgument, match="bad grammar"):
        generate(service)
    assert service.engine_load.total() == 0


def test_an_engine_known_dead_is_refused_before_the_engine_is_asked():
    engine = FailingEngine(AssertionError("the engine was asked"))
    engine.errored = True
    with pytest.raises(ServiceUnavailable):
        generate(llm_service_on(engine))
