"""Which KV-cache blocks one replica holds, as far as this front worker knows (`BlockIndex`).

Three sources, most trusted first: `held` (the engine's own /kv_events), `predicted` (the blocks of
requests just sent there, until events confirm them or `prediction_ttl_s` passes) and `history`
(this worker's routing history, used while the replica has no events). Keys are
services/kv_blocks.py's; docs/architecture.md, "Routing", says why each source exists.
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
