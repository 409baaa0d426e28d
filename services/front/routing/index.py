"""Which KV-cache blocks each replica holds, as far as this front worker knows (`BlockIndex`, one
per replica, and `FleetIndex`, what they report across the fleet: one walk along a prompt's keys).

Four sources: `held` and `pending` (the replica's own /kv_events: blocks its engine holds, and
those of requests it accepted), `predicted` (blocks of requests this worker just sent there, until
events confirm them or `prediction_ttl_s` passes) and `history` (this worker's routing history,
alone while the replica has no live events, added to the rest while its index is `degraded`).
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


class FleetIndex:
    """For every key some replica reports (held or pending), which replicas report it: a bit each,
    so that how far each replica holds a prompt comes from one walk along its keys, however many
    replicas there are (each BlockIndex keeps its bit here in step with its own sets)."""

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}  # key -> the bits of the replicas reporting it
        self._free: list[int] = []
        self._slots = 0

    def take_bit(self) -> int:
        slot = self._free.pop() if self._free else self._slots
        self._slots = max(self._slots, slot + 1)
        return 1 << slot

    def give_back(self, bit: int) -> None:
        self._free.append(bit.bit_length() - 1)

    def add(self, key: int, bit: int) -> None:
        self.holders[key] = self.holders.get(key, 0) | bit

    def discard(self, key: int, bit: int) -> None:
        holders = self.holders.get(key, 0) & ~bit
        if holders:
            self.holders[key] = holders
        else:
            self.holders.pop(key, None)

    def leading(self, keys: Sequence[int], bits: Sequence[int]) -> dict[int, int]:
        """bit -> how many of the prompt's first keys that replica reports: one walk, which stops
        where no replica of `bits` reports the next key."""
        alive = 0
        for bit in bits:
            alive |= bit
        counts: dict[int, int] = {}
        holders = self.holders
        for position, key in enumerate(keys):
            still = holders.get(key, 0) & alive
            if still != alive:
                dropped = alive & ~still
                while dropped:
                    lowest = dropped & -dropped
                    counts[lowest] = position
                    dropped ^= lowest
                alive = still
                if not alive:
                    return counts
        while alive:
            lowest = alive & -alive
            counts[lowest] = len(keys)
            alive ^= lowest
        return counts


class BlockIndex:
    def __init__(self, capacity: int, *, prediction_ttl_s: float = PREDICTION_TTL_S,
                 fleet: FleetIndex | None = None) -> None:
        self.capacity = max(1, capacity)
        self.prediction_ttl_s = prediction_ttl_s
        self.fleet = fleet if fleet is not None else FleetIndex()  # a replica alone: a fleet of its own
        self.bit = self.fleet.take_bit()
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
        pending. The first frame of a stream (this index not live), and any `cleared` one, is a
        snapshot: it replaces what is held and pending."""
        held, pending, fleet, bit = self.held, self.pending, self.fleet, self.bit
        if not self.live or frame.cleared:
            self._forget_reported()
            self.live = True
        self.degraded = frame.degraded
        for key in frame.removed:
            if key in held:
                held.discard(key)
                if key not in pending:
                    fleet.discard(key, bit)
            self.predicted.pop(key, None)
        for key in frame.stored:
            if key not in held:
                held.add(key)
                fleet.add(key, bit)
            pending.discard(key)
            self.predicted.pop(key, None)  # confirmed
        for key in frame.unpending:
            if key in pending:
                pending.discard(key)
                if key not in held:
                    fleet.discard(key, bit)
        for key in frame.pending:
            if key not in pending and key not in held:
                pending.add(key)
                fleet.add(key, bit)

    def events_lost(self) -> None:
        """The stream ended or went silent: until a new snapshot, the history stands in for the engine."""
        self.live = False
        self.degraded = False
        self._forget_reported()

    def release(self) -> None:
        """This index is replaced (a new engine there, or the replica left): its keys and its bit
        leave the fleet."""
        self._forget_reported()
        self.fleet.give_back(self.bit)
        self.bit = 0

    def _forget_reported(self) -> None:
        fleet, bit = self.fleet, self.bit
        for key in self.held | self.pending:
            fleet.discard(key, bit)
        self.held.clear()
        self.pending.clear()

    # --- routing ------------------------------------------------------------------------------------

    def cached_prefix(self, keys: Sequence[int], now: float, reported: int | None = None) -> int:
        """How many of the prompt's first blocks this replica holds (or is believed to); given
        `reported`, how many of them it reports held or pending (`FleetIndex.leading`), the walk
        goes on from there, and only where this worker's predictions or history may add to it."""
        if reported is not None and self.live and not self.predicted and not self.degraded:
            return reported
        count = reported if reported is not None and self.live else 0
        history = self.history
        if not self.live:
            for key in keys:
                if key not in history:
                    break
                count += 1
            return count
        held, pending, predicted, degraded = self.held, self.pending, self.predicted, self.degraded
        for key in keys[count:]:
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
