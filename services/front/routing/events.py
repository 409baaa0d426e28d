"""One replica's `/kv_events` stream, followed into its `BlockIndex` and load.

Each stream starts with a snapshot, so nothing is carried over a reconnect; a snapshot of another
epoch is another engine, and the replica's index starts over. A stream that ends, fails or sends
nothing for `silence_s` (the replica sends its load every second) is lost: the index falls back to
this worker's routing history and the load to its own in-flight count, and the stream is opened
again after a backoff (doubling from `first_backoff_s` to `max_backoff_s`).
"""

from __future__ import annotations

import asyncio
import logging

from services.front.routing.replica import Replica

logger = logging.getLogger("bentoml.service.prompt")

EVENTS_SILENCE_S = 3.5  # about three missed one-second load frames: the stream is dead
# A replica that names no epoch predates that contract: it sent its load every 5 s when idle (two
# missed, and a second). Without this, a front updated before its replicas would drop every idle stream.
UNNAMED_SILENCE_S = 11.0


def _lost(replica: Replica) -> None:
    if replica.index is not None:
        replica.index.events_lost()
    replica.report(None)
    replica.metrics.events_live.set(0)


async def follow_cache_events(replica: Replica, *, first_backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                              silence_s: float = EVENTS_SILENCE_S) -> None:
    backoff = first_backoff_s
    while True:
        info = replica.info
        if not replica.ready or info is None or not info.kv_events or replica.index is None:
            await asyncio.sleep(replica.monitor.interval_s)  # nothing to follow (yet)
            continue
        try:
            index = None  # the index this stream feeds, once its snapshot came
            deadline_s = silence_s if replica.epoch is not None else max(silence_s, UNNAMED_SILENCE_S)
            async for frame in replica.client.kv_events(deadline_s):
                if index is None:
                    if frame.epoch != replica.epoch:  # restarted since its model info (or the last snapshot)
                        replica.forget(frame.epoch)
                    index = replica.index
                    if index is None:  # the replica came back with prefix caching off
                        break
                    replica.metrics.events_live.set(1)
                elif replica.index is not index:  # forgotten meanwhile (a new engine): follow it anew
                    break
                index.apply(frame)
                if frame.load is not None:
                    replica.report(frame.load)
                backoff = first_backoff_s
            else:
                logger.warning("GPU tier replica %s ended its /kv_events stream; following it again", replica.name)
        except asyncio.CancelledError:
            _lost(replica)
            raise
        except TimeoutError:
            logger.warning("GPU tier replica %s sent nothing on /kv_events for %.1f s: its index is not trusted "
                           "until a new stream's snapshot (next try in %.1f s)", replica.name, deadline_s, backoff)
        except Exception as error:  # refused, reset, 4xx/5xx, a bad frame: never ends the loop
            logger.warning("GPU tier replica %s: /kv_events failed (%r); routing by this worker's history "
                           "until it is back (next try in %.1f s)", replica.name, error, backoff)
        _lost(replica)
        await asyncio.sleep(backoff)
        backoff = min(max_backoff_s, backoff * 2)
