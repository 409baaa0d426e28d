"""Which KV-cache blocks one replica holds, as far as this front worker knows: the router's view of
one replica's prefix cache, keyed by `services/kv_blocks.py`'s block keys.

Three sources, in the order they are trusted:

- `held`: what the replica's engine says it holds (its `/kv_events` stream: a snapshot, then
  deltas). Bounded by the blocks that exist there: the engine reports every removal.
- `predicted`: the blocks of requests this worker just sent there, counted as held until the
  engine's events confirm them (a `stored` key drops its prediction) or `prediction_ttl_s` passes.
  So a burst of requests with one new prefix goes to one replica, not wherever each lands before
  the first events arrive. Bounded by the TTL and by the replica's capacity.
- `history`: this worker's routing history, least recently routed first, bounded by the
  replica's `kv_cache_blocks`: the approximate index used while the replica has no events (its
  ModelInfo says `kv_events` false, or its stream is down). Kept always, so it is warm when a
  stream goes down.

`cached_prefix` is one walk along a prompt's keys (dict and set lookups: about a microsecond per
block of the prompt).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from services.protocol import CacheEvents

PREDICTION_TTL_S = 3.0  # long enough for the engine's first events to arrive, short enough to forget a misroute


class BlockIndex:
    def __init__(self, capacity: int, *, prediction_ttl_s: float = PREDICTION_TTL_S) -> None:
        self.capacity = max(1, capacity)
        self.prediction_ttl_s = prediction_ttl_s
        self.live = False  # the engine's events are flowing (a snapshot arrived on the current stream)
        self.held: set[int] = set()
        self.predicted: dict[int, float] = {}  # key -> expiry; insertion order is expiry order
        self.history: OrderedDict[int, None] = OrderedDict()

    # --- the engine's events ----------------------------------------------------------------------

    def apply(self, frame: CacheEvents) -> None:
        """One frame of `/kv_events`, in the contract's order: cleared, removed, stored. The first
        frame of a stream is a snapshot (cleared + every key held)."""
        if frame.cleared:
            self.held.clear()
            self.live = True
        for key in frame.removed:
            self.held.discard(key)
            self.predicted.pop(key, None)
        for key in frame.stored:
            self.held.add(key)
            self.predicted.pop(key, None)  # confirmed

    def events_lost(self) -> None:
        """The stream ended: until a new snapshot, the history stands in for the engine."""
        self.live = False
        self.held.clear()

    # --- routing ------------------------------------------------------------------------------------

    def cached_prefix(self, keys: Sequence[int], now: float) -> int:
        """How many of the prompt's first blocks this replica holds (or is believed to)."""
        count = 0
        if self.live:
            held, predicted = self.held, self.predicted
            for key in keys:
                if key not in held and predicted.get(key, 0.0) <= now:
                    break
                count += 1
        else:
            history = self.history
            for key in keys:
                if key not in history:
                    break
                count += 1
        return count

    def routed(self, keys: Sequence[int], now: float) -> None:
        """A request with these blocks was just sent to this replica."""
        predicted, history = self.predicted, self.history
        while predicted:  # the oldest entries expire first
            oldest = next(iter(predicted))
            if predicted[oldest] > now and len(predicted) < self.capacity:
                break
            del predicted[oldest]
        expiry = now + self.prediction_ttl_s
        for key in keys:
            if self.live and key not in self.held:
                predicted.pop(key, None)
                predicted[key] = expiry
            history[key] = None
            history.move_to_end(key)
        while len(history) > self.capacity:
            history.popitem(last=False)
        while len(predicted) > self.capacity:
            del predicted[next(iter(predicted))]
