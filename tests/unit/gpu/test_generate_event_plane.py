"""What /generate tells the event plane, with no engine (a stand-in engine client): a request's
block keys are checked against its prompt, announced as pending and ended whichever way the
request ends; its prompt tokens count as prefill until its first output."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from bentoml.exceptions import InvalidArgument
from vllm.v1.engine.exceptions import EngineDeadError

from services.gpu.draining import Drain
from services.gpu.engine_clients import EngineLoad
from services.gpu.llm_service import LLMService, _input_errors
from services.protocol import GenerateRequest, ModelInfo, SamplingParams

BLOCK = 4


class StepEngine:
    """An engine client whose stream gives one output each time the test lets it (`step`)."""

    errored = False

    def __init__(self, outputs: int = 2, error: Exception | None = None) -> None:
        self.outputs, self.error = outputs, error
        self.steps = asyncio.Queue()

    async def generate(self, prompt, params, request_id, lora_request=None):
        if self.error is not None:
            raise self.error
        for n in range(self.outputs):
            await self.steps.get()
            last = n == self.outputs - 1
            choice = SimpleNamespace(index=0, token_ids=[7], logprobs=None, finish_reason="length" if last else None,
                                     stop_reason=None)
            yield SimpleNamespace(outputs=[choice], finished=last)

    async def abort(self, request_ids):
        pass


class Relay:
    """What the worker tells the replica's indexer."""

    def __init__(self) -> None:
        self.told: list[tuple[str, str, list[int] | None]] = []

    def pending(self, request_id, keys):
        self.told.append(("pending", request_id, list(keys)))

    def done(self, request_id):
        self.told.append(("done", request_id, None))


def service_on(engine) -> object:
    service = object.__new__(LLMService.inner)
    service.engine = engine
    service.engine_load = EngineLoad(None)
    service.drain = Drain(lambda: 0, timeout_s=1)
    service.input_errors = _input_errors()
    service.engine_dead_error = EngineDeadError
    service.adapters = None
    service.info = ModelInfo(model="m", max_model_len=256, vocab_size=100)
    service.block_size = BLOCK
    service.kv_relay = Relay()
    return service


def request(tokens: int = 10, keys: list[int] | None = None, request_id: str = "r1") -> GenerateRequest:
    return GenerateRequest(request_id=request_id, token_ids=[1] * tokens, block_keys=keys,
                           sampling_params=SamplingParams(max_tokens=4))


def stream(service, body: GenerateRequest):
    return LLMService.inner.generate.func(service, body)


def test_more_keys_than_full_blocks_is_a_400_that_says_so():
    service = service_on(StepEngine())

    async def run():
        with pytest.raises(InvalidArgument, match=r"block_keys has 3 keys, more than the prompt's 2 full blocks"):
            await stream(service, request(tokens=11, keys=[1, 2, 3])).__anext__()

    asyncio.run(run())
    assert service.kv_relay.told == [] and service.engine_load.total() == 0


def test_keys_are_pending_while_the_request_runs_and_done_when_it_finishes():
    engine = StepEngine(outputs=2)
    service = service_on(engine)

    async def run():
        frames = stream(service, request(tokens=10, keys=[5, 6]))
        first = asyncio.ensure_future(frames.__anext__())
        await asyncio.sleep(0.05)
        assert service.kv_relay.told == [("pending", "r1", [5, 6])]
        assert service.engine_load.prefill_tokens() == 10, "the prompt waits for its first output"
        engine.steps.put_nowait(1)
        await first
        assert service.engine_load.prefill_tokens() == 0 and service.engine_load.total() == 1
        engine.steps.put_nowait(1)
        assert [frame async for frame in frames]
        assert service.kv_relay.told[-1] == ("done", "r1", None)
        assert service.engine_load.total() == 0 and service.engine_load.prefill_tokens() == 0

    asyncio.run(run())


def test_keys_are_done_when_the_client_leaves_or_the_engine_fails():
    engine = StepEngine(outputs=3)
    service = service_on(engine)

    async def leave():  # the call is cancelled while the engine prefills
        first = asyncio.ensure_future(stream(service, request(keys=[5])).__anext__())
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(leave())
    assert service.kv_relay.told == [("pending", "r1", [5]), ("done", "r1", None)]
    assert service.engine_load.total() == 0 and service.engine_load.prefill_tokens() == 0

    failing = service_on(StepEngine(error=ValueError("bad grammar")))

    async def fail():
        with pytest.raises(InvalidArgument):
            await stream(failing, request(keys=[5])).__anext__()

    asyncio.run(fail())
    assert failing.kv_relay.told == [("pending", "r1", [5]), ("done", "r1", None)]
    assert failing.engine_load.prefill_tokens() == 0


def test_a_request_without_keys_tells_the_indexer_nothing():
    engine = StepEngine(outputs=1)
    service = service_on(engine)

    async def run():
        engine.steps.put_nowait(1)
        assert [frame async for frame in stream(service, request())]

    asyncio.run(run())
    assert service.kv_relay.told == []
