"""The GPU tier over several replicas, in the shape of one `LLMClient` (`generate`, `model_info`,
`update_adapter`), so `TextGeneration` and the OpenAI handlers do not know how many there are.

`generate` streams from the replica the policy picks among those serving the request's adapter;
one that fails or refuses before its first frame is closed (aborting the engine request there),
what routing recorded there is taken back, and the request goes once to another. `model_info` is
the ready replicas' as one; `update_adapter` goes to every ready one (docs/architecture.md, "Routing").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from services.errors import DeadlineExceeded, Overloaded, RequestError, TierUnavailable
from services.front.metrics import front_metrics
from services.front.routing.index import BlockIndex, Routed
from services.front.routing.policy import Prompt, RoundRobin
from services.front.routing.replica import Replica
from services.front.routing.replicas import ReplicaSet
from services.protocol import AdapterUpdate, GenerateDelta, GenerateRequest, LoadAdapterRequest, ModelInfo, UnloadAdapterRequest

logger = logging.getLogger("bentoml.service.prompt")


def worth_another_replica(error: RequestError, request: GenerateRequest) -> bool:
    """A replica's failure or refusal (another may take it), not the request's fault; or its 404
    for the request's adapter (unloaded there since its model info said it served it)."""
    if isinstance(error, (TierUnavailable, Overloaded)):
        return True
    if error.status == 404 and request.adapter is not None:
        return True
    return error.status >= 500 and not isinstance(error, DeadlineExceeded)


@dataclass(slots=True)
class Sending:
    """A request routed to one replica: what to send it, and how to take back what routing it
    recorded there (its predicted blocks and history) if the replica refuses it."""

    replica: Replica
    keys: list[int] | None  # the prompt's block keys at its block size (None: not looked at)
    index: BlockIndex | None  # the index that recorded the request (the replica's may be replaced since)
    routed: Routed | None  # what it recorded
    prefill_tokens: int = 0  # the prompt's tokens the replica is not believed to hold: its prefill there

    def request(self, request: GenerateRequest) -> GenerateRequest:
        """`request` with the prompt's block keys at this replica's block size, for a replica that
        streams events (it announces them as pending to every front)."""
        info = self.replica.info
        if self.keys is None or info is None or not info.kv_events:
            return request
        return request.model_copy(update={"block_keys": self.keys})

    def refused(self) -> None:
        if self.index is not None and self.routed is not None:
            self.index.unrouted(self.routed)


class ReplicaRouter:
    def __init__(self, replicas: ReplicaSet, policy: RoundRobin) -> None:
        self.replicas = replicas
        self.policy = policy

    def route(self, prompt: Prompt, exclude: tuple[Replica, ...] = ()) -> Sending:
        """The replica that takes `prompt` now (one serving its adapter), counted there (metrics,
        predicted blocks); the caller counts the request's load there (`Replica.sent` ... `ended`)."""
        candidates = [replica for replica in self.replicas.ready_replicas(exclude) if replica.serves(prompt.adapter)]
        if not candidates:
            self.replicas.require()
            if prompt.adapter is not None:  # what a replica without it answers (vLLM's words)
                raise RequestError(f"The model `{prompt.adapter}` does not exist.", status=404)
            raise TierUnavailable("no other GPU tier replica is ready", retry_after_s=self.replicas.retry_after_s)
        now = time.monotonic()
        choice = self.policy.choose(candidates, prompt, now)
        replica, index, routed = choice.replica, choice.replica.index, None
        if choice.keys is not None and index is not None:
            routed = index.routed(choice.keys, now)
        metrics = replica.metrics
        metrics.requests.inc()
        metrics.prompt_blocks.inc(choice.blocks)
        metrics.cached_blocks_predicted.inc(choice.cached)
        if choice.reason is not None:
            front_metrics().routing_reason[choice.reason].inc()
        return Sending(replica, choice.keys, index, routed,
                       len(prompt.token_ids) - choice.cached * (replica.block_size or 0))

    async def generate(self, request: GenerateRequest, *, deadline: float, timeout_s: float) -> AsyncIterator[GenerateDelta]:
        prompt = Prompt(request.token_ids, request.adapter)
        tried: tuple[Replica, ...] = ()
        while True:
            sending = self.route(prompt, exclude=tried)
            replica = sending.replica
            sent = replica.sent(prefill_tokens=sending.prefill_tokens)
            replica.inflight += 1
            replica.metrics.inflight.inc()
            started, unfinished = False, request.sampling_params.n
            try:
                async with aclosing(replica.client.generate(sending.request(request), deadline=deadline,
                                                            timeout_s=timeout_s)) as deltas:
                    async for delta in deltas:
                        started = True
                        if delta.finish_reason is not None:
                            unfinished -= 1
                            if unfinished == 0:  # the engine is done with it, whenever the reader closes
                                self._release(replica, sent)
                        yield delta
                return
            except RequestError as error:
                if started or isinstance(error, DeadlineExceeded):
                    raise
                sending.refused()  # it took nothing: what routing predicted there is taken back
                if error.status == 404 and request.adapter is not None:
                    replica.lacks(request.adapter)
                if tried or not worth_another_replica(error, request) or not self._another(prompt, replica):
                    raise
                logger.warning("request %s: replica %s failed before its first token (%s); trying another",
                               request.request_id, replica.name, error.message)
                replica.metrics.retries.inc()
                tried = (replica,)
            finally:
                if unfinished > 0:
                    self._release(replica, sent)

    def _another(self, prompt: Prompt, replica: Replica) -> bool:
        return any(other.serves(prompt.adapter) for other in self.replicas.ready_replicas((replica,)))

    def _release(self, replica: Replica, sent: int) -> None:
        replica.ended(sent)
        replica.inflight -= 1
        replica.metrics.inflight.dec()
        self.replicas.released(replica)

    async def model_info(self, timeout_s: float = 5.0) -> ModelInfo:
        """Every ready replica's model info as one (each replica keeps its own)."""
        ready = self.replicas.ready_replicas()
        if not ready:
            self.replicas.require()
        answers = await asyncio.gather(*(replica.client.model_info(timeout_s) for replica in ready),
                                       return_exceptions=True)
        infos = []
        for replica, answer in zip(ready, answers):
            if isinstance(answer, BaseException):
                logger.warning("GPU tier replica %s gave no model info: %r", replica.name, answer)
                continue
            replica.use(answer)
            infos.append(answer)
        if not infos:
            raise TierUnavailable("no GPU tier replica answered /model_info", retry_after_s=self.replicas.retry_after_s)
        adapters = {adapter.name: adapter for info in infos for adapter in info.adapters}
        return infos[0].model_copy(update={
            "max_model_len": min(info.max_model_len for info in infos), "adapters": list(adapters.values())})

    async def update_adapter(self, request: LoadAdapterRequest | UnloadAdapterRequest, timeout_s: float = 300.0) -> AdapterUpdate:
        """A LoRA load or unload on every ready replica; vLLM's answer when they agree, else each one's."""
        ready = self.replicas.ready_replicas()
        if not ready:
            self.replicas.require()
        answers = await asyncio.gather(*(replica.client.update_adapter(request, timeout_s) for replica in ready),
                                       return_exceptions=True)
        updates = []
        for replica, answer in zip(ready, answers):
            if isinstance(answer, RequestError):
                answer = AdapterUpdate(status=answer.status, message=answer.message, type="ServiceUnavailableError")
            elif isinstance(answer, BaseException):
                raise answer
            updates.append((replica, answer))
        if len({(update.status, update.message) for _, update in updates}) == 1:
            return updates[0][1]
        failed = [update for _, update in updates if update.status != 200]
        message = "; ".join(f"replica {replica.name}: {update.message}" for replica, update in updates)
        return AdapterUpdate(status=failed[0].status, message=message, type=failed[0].type)

    async def is_ready(self) -> bool:
        return self.replicas.ready

    async def close(self) -> None:
        await self.replicas.stop()
