"""One replica's `/kv_events` stream, followed into its `BlockIndex` and load.

Each stream starts with a snapshot, so nothing is carried over a reconnect. While it is down, the
index falls back to this worker's routing history and the load to its own in-flight count, and
the stream is opened again after a backoff (doubling from `first_backoff_s` to `max_backoff_s`).
"""

from __future__ import annotations

import asyncio
import logging

from services.front.routing.replica import Replica

logger = logging.getLogger("bentoml.service.prompt")


def _lost(replica: Replica) -> None:
    if replica.index is not None:
        replica.index.events_lost()
    replica.report(None)


async def follow_cache_events(replica: Replica, *, first_backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
    backoff = first_backoff_s
    while True:
        info = replica.info
        if not replica.ready or info is None or not info.kv_events or replica.index is None:
            await asyncio.sleep(replica.monitor.interval_s)  # nothing to follow (yet)
            continue
        try:
            async for frame in replica.client.kv_events():
                index = replica.index
                if index is None:  # the replica came back with prefix caching off
                    break
                index.apply(frame)
                if frame.load is not None:
                    replica.report(frame.load)
                if index.live:
                    backoff = first_backoff_s
            logger.warning("GPU tier replica %s ended its /kv_events stream; following it again", replica.name)
        except asyncio.CancelledError:
            _lost(replica)
            raise
        except Exception as error:  # refused, reset, 4xx/5xx, a bad frame: never ends the loop
            logger.warning("GPU tier replica %s: /kv_events failed (%r); routing by this worker's history "
                           "until it is back (next try in %.1f s)", replica.name, error, backoff)
        _lost(replica)
        await asyncio.sleep(backoff)
        backoff = min(max_backoff_s, backoff * 2)
