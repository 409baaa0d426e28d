"""One GPU-tier replica as a front worker sees it: its client, readiness, model info, index and load.

A `Replica` holds its own `LLMClient` and `TierMonitor` (the one-tier classes, per replica), the
`BlockIndex` of what it caches, and the load the router reads (`active_requests`: the engine's
last report plus what this worker sent since). A leaf of routing/: replicas.py, events.py,
policy.py and router.py import it; it imports none of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import cached_property

from services.front.health import TierMonitor
from services.front.llm_client import LLMClient
from services.front.metrics import front_metrics
from services.front.routing.discovery import replica_name
from services.front.routing.index import PREDICTION_TTL_S, BlockIndex, FleetIndex
from services.protocol import ModelInfo, ReplicaLoad

logger = logging.getLogger("bentoml.service.prompt")

DEFAULT_CAPACITY_BLOCKS = 4096  # the history's bound for a replica that does not say its cache size


class Replica:
    """One LLMService replica as this worker sees it."""

    def __init__(self, url: str, *, token: str, timeout_s: float, check_interval_s: float, retry_after_s: int,
                 on_change: Callable[[Replica, bool], None], prediction_ttl_s: float = PREDICTION_TTL_S,
                 fleet: FleetIndex | None = None) -> None:
        self.url = url
        self.fleet = fleet if fleet is not None else FleetIndex()  # shared by the worker's replicas (ReplicaSet)
        self.name = replica_name(url)
        self.monitor = TierMonitor(self.name, interval_s=check_interval_s, retry_after_s=retry_after_s,
                                   on_change=lambda ready: on_change(self, ready))
        self.client = LLMClient(url, token=token, timeout_s=timeout_s, monitor=self.monitor)
        self.prediction_ttl_s = prediction_ttl_s
        self.info: ModelInfo | None = None
        self.epoch: str | None = None  # the engine's start this worker's knowledge is of (ModelInfo, snapshots)
        self.adapters: set[str] = set()  # the LoRA adapters it serves, by name
        self.index: BlockIndex | None = None  # made once the block size is known; None: no prefix cache
        self.load: ReplicaLoad | None = None  # the engine's own last report (None while its stream is down)
        self.sent_since_report = 0  # requests this worker sent since that report, still running
        self.prefill_sent_since_report = 0  # their prompt tokens the replica did not hold (to prefill)
        self.report_number = 0  # which report the two count from
        self.inflight = 0  # this worker's requests streaming from it now
        self.retired = False  # left discovery: no new request; closed when its last stream ends
        self.tasks: list[asyncio.Task] = []
        self.metrics.ready.set(0)
        self.metrics.events_live.set(0)

    @cached_property
    def metrics(self):
        return front_metrics().for_replica(self.name)

    @property
    def ready(self) -> bool:
        return self.monitor.ready and not self.retired

    @property
    def block_size(self) -> int | None:
        return self.info.kv_block_size if self.info is not None else None

    def use(self, info: ModelInfo, *, came_up: bool = False) -> None:
        """The replica's model info (each time it comes up, `came_up`, and after adapter changes).
        Another epoch is another engine, whose cache began empty: what this worker knew of the
        replica is forgotten. So is it when a replica that names no epoch comes up again (it may
        have restarted: nothing says it did not)."""
        if self.info is not None and (info.epoch != self.epoch or (came_up and info.epoch is None)):
            self.forget(info.epoch)
        if self.index is None or info.kv_block_size != self.block_size:
            self._replace_index(None if info.kv_block_size is None else self._new_index(info))
        elif info.kv_cache_blocks:
            self.index.capacity = info.kv_cache_blocks
        self.info, self.epoch = info, info.epoch
        self.adapters = {adapter.name for adapter in info.adapters}

    def forget(self, epoch: str | None) -> None:
        """The replica runs a new engine (`epoch`): its index, predictions, routing history and
        load start empty, so no request goes there on the strength of the old engine's cache."""
        logger.warning("GPU tier replica %s runs a new engine (epoch %s, was %s), or may: what this worker knew "
                       "of its cache is forgotten", self.name, epoch, self.epoch)
        self.epoch = epoch
        if self.index is not None:
            self._replace_index(self._new_index(self.info))
        self.report(None)

    def _new_index(self, info: ModelInfo | None) -> BlockIndex:
        capacity = (info.kv_cache_blocks if info is not None else None) or DEFAULT_CAPACITY_BLOCKS
        return BlockIndex(capacity, prediction_ttl_s=self.prediction_ttl_s, fleet=self.fleet)

    def _replace_index(self, index: BlockIndex | None) -> None:
        if self.index is not None:
            self.index.release()
        self.index = index

    def serves(self, adapter: str | None) -> bool:
        """Whether it serves `adapter` (None: the base model), as its model info said last."""
        return adapter is None or adapter in self.adapters

    def lacks(self, adapter: str) -> None:
        """It answered that it does not serve `adapter` (unloaded there since its model info)."""
        self.adapters.discard(adapter)

    def report(self, load: ReplicaLoad | None) -> None:
        """The engine's load as it measured it (None: no report to go by)."""
        self.load, self.sent_since_report, self.prefill_sent_since_report = load, 0, 0
        self.report_number += 1

    def sent(self, prefill_tokens: int = 0) -> tuple[int, int]:
        """A request of this worker's starts here, with `prefill_tokens` of its prompt not held
        there: counted until it ends or the next report (which counts it itself); returns what
        `ended` needs to tell which."""
        self.sent_since_report += 1
        self.prefill_sent_since_report += prefill_tokens
        return self.report_number, prefill_tokens

    def ended(self, sent: tuple[int, int]) -> None:
        report_number, prefill_tokens = sent
        if report_number == self.report_number:  # ended before the engine reported again: no longer load
            self.sent_since_report -= 1
            self.prefill_sent_since_report -= prefill_tokens

    @property
    def active_requests(self) -> int:
        """Its engine's running and waiting requests (over every front that sends it work), plus
        those this worker sent since that report and that still run; never fewer than this
        worker's own in flight there (a report taken before requests sent just before it reached
        the replica would miss them, and they are no longer counted as sent since); without a
        report, this worker's own in flight."""
        if self.load is None:
            return self.inflight
        return max(self.load.running + self.load.waiting + self.sent_since_report, self.inflight)

    @property
    def queued_prefill(self) -> int:
        """Prompt tokens queued for prefill there: its engine's report (over every front), plus
        the new tokens of what this worker sent since."""
        return (self.load.prefill_tokens if self.load is not None else 0) + self.prefill_sent_since_report

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._replace_index(None)  # its keys leave the fleet's index
        await self.monitor.stop()
        await self.client.close()
