"""The GPU tier as a set of replicas, one `ReplicaSet` per front worker: who they are, which are ready.

Every `refresh_s` it asks discovery for the URLs: a new one becomes a `Replica` (given its model
info, and with runtime LoRA the others' adapters, before it is ready; its /kv_events followed), one
gone is retired and closed when its last stream ends. The set is ready while one replica is, and
offers the admission middleware a `TierMonitor`'s door, so the front works alike over one or many.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.errors import TierUnavailable
from services.front.metrics import front_metrics
from services.front.routing.discovery import DiscoveryError, Source
from services.front.routing.events import EVENTS_SILENCE_S, follow_cache_events
from services.front.routing.index import PREDICTION_TTL_S, FleetIndex
from services.front.routing.replica import Replica
from services.protocol import LoadAdapterRequest, ModelInfo

logger = logging.getLogger("bentoml.service.prompt")


class ReplicaSet:
    def __init__(self, source: Source, *, token: str, timeout_s: float, refresh_s: float, check_interval_s: float,
                 retry_after_s: int = 1, sync_adapters: bool = False, follow_events: bool = True,
                 prediction_ttl_s: float = PREDICTION_TTL_S, events_silence_s: float = EVENTS_SILENCE_S) -> None:
        self.source = source
        self.events_silence_s = events_silence_s
        self.refresh_s = refresh_s
        self.retry_after_s = retry_after_s
        self.sync_adapters = sync_adapters
        self.follow_events = follow_events
        self.fleet = FleetIndex()  # what every replica reports, for one walk along a prompt's keys
        self._replica_options = dict(token=token, timeout_s=timeout_s, check_interval_s=check_interval_s,
                                     retry_after_s=retry_after_s, prediction_ttl_s=prediction_ttl_s, fleet=self.fleet)
        self.replicas: dict[str, Replica] = {}  # by URL, in discovery order
        self.discovery_problem: str | None = "not discovered yet"
        self.seen_ready = False
        self.on_ready: Callable[[], Awaitable[None]] | None = None
        self._refresher: asyncio.Task | None = None
        self._confirming: asyncio.Future | None = None
        self._background: set[asyncio.Task] = set()  # announcements and closes, referenced until done
        self._draining: set[Replica] = set()  # retired, closed when their last stream ends

    # --- life ---------------------------------------------------------------------------------------

    def start(self, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Discover and watch in the running event loop; `on_ready` runs each time a replica turns
        ready (PromptService learns the tier's limits and adapters there)."""
        self.on_ready = on_ready
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*(replica.close() for replica in [*self.replicas.values(), *self._draining]))
        self.replicas.clear()
        self._draining.clear()

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        """One discovery round: new replicas are watched, replicas gone are retired."""
        try:
            urls = await self.source.replicas()
            problem = None
        except DiscoveryError as error:
            urls, problem = [], str(error)
        except Exception as error:  # a source must never end the loop
            urls, problem = [], f"discovery through {self.source} failed: {error!r}"
        if problem != self.discovery_problem:
            if problem:
                logger.error("GPU tier replicas: %s; not ready until it is fixed (PIPELINE_GPU_TIER_REPLICAS)", problem)
            else:
                logger.warning("GPU tier replicas from %s: %s", self.source, ", ".join(urls))
            self.discovery_problem = problem
        for url in urls:
            if url not in self.replicas:
                self._add(url)
        for url in [url for url in self.replicas if url not in urls]:
            self._retire(self.replicas.pop(url))
        self._report_readiness()

    def _add(self, url: str) -> None:
        replica = Replica(url, on_change=self._changed, **self._replica_options)
        self.replicas[url] = replica
        replica.monitor.watch(replica.client.is_ready, on_ready=lambda: self._bring_up(replica))
        if self.follow_events:
            replica.tasks.append(asyncio.get_running_loop().create_task(
                follow_cache_events(replica, silence_s=self.events_silence_s)))
        logger.warning("GPU tier replica %s joined", replica.name)

    def _retire(self, replica: Replica) -> None:
        logger.warning("GPU tier replica %s left discovery; it takes no new request (%d streaming)",
                       replica.name, replica.inflight)
        replica.retired = True
        replica.metrics.ready.set(0)
        self._in_background(replica.monitor.stop())  # its readiness no longer matters
        self._draining.add(replica)
        self.released(replica)  # at once when nothing runs on it; else when its last stream ends

    def released(self, replica: Replica) -> None:
        """A stream from `replica` ended: close a retired replica once nothing runs on it."""
        if replica.retired and replica.inflight == 0 and replica in self._draining:
            self._draining.discard(replica)
            self._in_background(replica.close())

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _bring_up(self, replica: Replica) -> None:
        """Before a replica is marked ready: its model info, and the adapters the others serve."""
        info = await replica.client.model_info()
        if self.sync_adapters:  # what the others serve now (asked: another worker may have unloaded one)
            answers = await asyncio.gather(*(other.client.model_info() for other in self.ready_replicas()),
                                           return_exceptions=True)
            served = {adapter.name for adapter in info.adapters}
            missing = {adapter.name: adapter for answer in answers if isinstance(answer, ModelInfo)
                       for adapter in answer.adapters if adapter.name not in served}
            for adapter in missing.values():
                update = await replica.client.update_adapter(
                    LoadAdapterRequest(lora_name=adapter.name, lora_path=adapter.path), require_ready=False)
                log = logger.warning if update.status == 200 else logger.error
                log("GPU tier replica %s given adapter %s (served by the others): %s", replica.name, adapter.name,
                    update.message)
            if missing:
                info = await replica.client.model_info()
        replica.use(info, came_up=True)

    # --- readiness ----------------------------------------------------------------------------------

    def _changed(self, replica: Replica, ready: bool) -> None:
        if replica.retired:
            return
        replica.metrics.ready.set(1 if ready else 0)
        if ready and self.on_ready is not None:  # after the monitor marks it ready, so it is counted
            self._in_background(self._announce())
        asyncio.get_running_loop().call_soon(self._report_readiness)

    async def _announce(self) -> None:
        try:
            await self.on_ready()
        except Exception as error:  # the replica stays ready; the front keeps what it knew
            logger.warning("could not take the GPU tier's model info after a replica turned ready: %r", error)

    def _report_readiness(self) -> None:
        ready = self.ready
        self.seen_ready = self.seen_ready or ready
        front_metrics().gpu_tier_ready.set(1 if ready else 0)

    def ready_replicas(self, exclude: tuple[Replica, ...] | list[Replica] = ()) -> list[Replica]:
        return [replica for replica in self.replicas.values() if replica.ready and replica not in exclude]

    @property
    def ready(self) -> bool:
        return any(replica.ready for replica in self.replicas.values())

    @property
    def reason(self) -> str:
        if self.discovery_problem:
            return self.discovery_problem
        if not self.replicas:
            return "no replica discovered"
        return "; ".join(f"{replica.name}: {replica.monitor.reason}" for replica in self.replicas.values())

    def require(self) -> None:
        """Raise TierUnavailable (503) unless a replica is ready."""
        if not self.ready:
            raise TierUnavailable(
                f"no GPU tier replica is available ({self.reason}); try again in {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )

    async def confirm_at_start(self) -> None:
        """As `TierMonitor.confirm_at_start`: a worker that has never seen a replica ready looks
        again (discovery and every replica's /readyz, once for all waiting requests) before a 503."""
        if self.ready or self.seen_ready:
            return
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.ensure_future(self._check_all())
        await asyncio.shield(self._confirming)

    async def _check_all(self) -> None:
        await self.refresh()
        await asyncio.gather(*(replica.monitor.check_now() for replica in self.replicas.values()))
        self._report_readiness()
