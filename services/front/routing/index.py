"""Which KV-cache blocks one replica holds, as far as this front worker knows (`BlockIndex`).

Four sources: `held` and `pending` (the replica's own /kv_events: blocks its engine holds, and
those of requests it accepted), `predicted` (blocks of requests this worker just sent there, until
events confirm them or `prediction_ttl_s` passes) and `history` (this worker's routing history,
alone while the replica has no live events, added to the rest while its index is `degraded`).
Keys are services/kv_blocks.py's; docs/architecture.md, "Routing", says why each source exists.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from services.protocol import CacheEvents

PREDICTION_TTL_S = 3.0  # long enough for the engine's first events to arrive, short enough to forget a misroute


class Routed(NamedTuple):
    """What `BlockIndex.routed` changed for one request, so that `unrouted` can take it back."""

    stamp: int  # this routing's number, in the history
    expiry: float  # its predictions' expiry
    before: list[tuple[int, float | None, int | None]]  # (key, its prediction before, its history stamp before)


class BlockIndex:
    def __init__(self, capacity: int, *, prediction_ttl_s: float = PREDICTION_TTL_S) -> None:
        self.capacity = max(1, capacity)
        self.prediction_ttl_s = prediction_ttl_s
        self.live = False  # the engine's events are flowing (a snapshot arrived on the current stream)
        self.degraded = False  # the replica's last frame said its own index may miss blocks
        self.held: set[int] = set()
        self.pending: set[int] = set()  # blocks of requests the replica accepted, not stored yet
        self.predicted: dict[int, float] = {}  # key -> expiry; insertion order is expiry order
        self.history: OrderedDict[int, int] = OrderedDict()  # key -> the stamp of the routing that added it
        self._routings = 0

    # --- the engine's events ----------------------------------------------------------------------

    def apply(self, frame: CacheEvents) -> None:
        """One frame of `/kv_events`, in the contract's order: cleared, removed, stored, unpending,
        pending. The first frame of a stream (this index not live) is a snapshot: it replaces what
        is held and pending."""
        if not self.live:
            self.held.clear()
            self.pending.clear()
            self.live = True
        elif frame.cleared:  # the engine dropped its blocks; the requests it accepted still stand
            self.held.clear()
        self.degraded = frame.degraded
        for key in frame.removed:
            self.held.discard(key)
            self.predicted.pop(key, None)
        for key in frame.stored:
            self.held.add(key)
            self.pending.discard(key)
            self.predicted.pop(key, None)  # confirmed
        self.pending.difference_update(frame.unpending)
        self.pending.update(frame.pending)

    def events_lost(self) -> None:
        """The stream ended or went silent: until a new snapshot, the history stands in for the engine."""
        self.live = False
        self.degraded = False
        self.held.clear()
        self.pending.clear()

    # --- routing ------------------------------------------------------------------------------------

    def cached_prefix(self, keys: Sequence[int], now: float) -> int:
        """How many of the prompt's first blocks this replica holds (or is believed to)."""
        count = 0
        history = self.history
        if not self.live:
            for key in keys:
                if key not in history:
                    break
                count += 1
            return count
        held, pending, predicted, degraded = self.held, self.pending, self.predicted, self.degraded
        for key in keys:
            if (key not in held and key not in pending and predicted.get(key, 0.0) <= now
                    and not (degraded and key in history)):
                break
            count += 1
        return count

    def routed(self, keys: Sequence[int], now: float) -> Routed:
        """A request with these blocks was just sent to this replica: they are predicted there and
        added to the history (what `unrouted` takes back if the replica refuses it)."""
        predicted, history = self.predicted, self.history
        while predicted:  # the oldest entries expire first
            oldest = next(iter(predicted))
            if predicted[oldest] > now and len(predicted) < self.capacity:
                break
            del predicted[oldest]
        self._routings += 1
        stamp, expiry = self._routings, now + self.prediction_ttl_s
        before = []
        for key in keys:
            before.append((key, predicted.get(key), history.get(key)))
            if self.live and key not in self.held:
                predicted.pop(key, None)
                predicted[key] = expiry
            history[key] = stamp
            history.move_to_end(key)
        while len(history) > self.capacity:
            history.popitem(last=False)
        while len(predicted) > self.capacity:
            del predicted[next(iter(predicted))]
        return Routed(stamp, expiry, before)

    def unrouted(self, routed: Routed) -> None:
        """The replica refused the request `routed` recorded: its predictions and history entries
        go back to what they were, except for keys routed here again since (another request's)."""
        predicted, history = self.predicted, self.history
        for key, prediction, stamp in routed.before:
            if history.get(key) != routed.stamp:
                continue
            if stamp is None:
                del history[key]
            else:
                history[key] = stamp
            if predicted.get(key) == routed.expiry:
                if prediction is None:
                    del predicted[key]
                else:
                    predicted[key] = prediction
