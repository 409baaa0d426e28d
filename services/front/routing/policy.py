"""Which ready replica takes a request: `PIPELINE_ROUTING` = `kv`, `least-loaded` or `round-robin`.

`kv` picks the lowest cost in prompt tokens of engine work: the prompt's tokens past the blocks a
replica holds or will hold, plus the prefill queued there, plus `load_weight` x its active requests,
minus an edge on the prompt's home (the replica every front worker picks alike for the prompt's
next block, by a rendezvous hash weighted by free cache). A full cache, a long queue or a load far
above the least loaded passes a replica over. The reasoning: docs/architecture.md, "Routing".
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from services.front.routing.replica import Replica
from services.kv_blocks import block_keys


class Prompt:
    """A request's token ids and adapter, with its block keys per block size, computed once."""

    __slots__ = ("_anchors", "_keys", "adapter", "token_ids")

    def __init__(self, token_ids: Sequence[int], adapter: str | None = None) -> None:
        self.token_ids = token_ids
        self.adapter = adapter
        self._keys: dict[int, list[int]] = {}
        self._anchors: dict[int, bytes] = {}

    def keys(self, block_size: int) -> list[int]:
        keys = self._keys.get(block_size)
        if keys is None:
            keys = self._keys[block_size] = block_keys(self.token_ids, block_size, self.adapter)
        return keys

    def blocks(self, block_size: int | None) -> int:
        return len(self.token_ids) // block_size if block_size else 0

    def anchor(self, tokens: int) -> bytes:
        """A digest of the adapter and the first `tokens` token ids: the same in every process."""
        anchor = self._anchors.get(tokens)
        if anchor is None:
            digest = hashlib.blake2b(f"{self.adapter or ''}\0".encode(), digest_size=16)
            digest.update(struct.pack(f"<{tokens}I", *self.token_ids[:tokens]))
            anchor = self._anchors[tokens] = digest.digest()
        return anchor


@dataclass(frozen=True)
class Weights:
    load_weight: float = 256.0  # prompt tokens to prefill that one active request weighs (its decode steps)
    kv_saturation: float = 0.95  # kv_usage at or above which a replica is passed over
    queue_saturation: int = 8  # waiting requests at or above which a replica is passed over
    home_tokens: int = 2048  # the home's largest edge, in tokens; 0: no home
    imbalance_requests: int = 32  # a replica this many active requests above the least loaded...
    imbalance_ratio: float = 1.5  # ...and this many times its load is passed over (vllm-router's cut-off)


@dataclass
class Choice:
    replica: Replica
    blocks: int  # the prompt's full blocks at this replica's block size
    cached: int  # of those, the ones the router believes the replica holds (0: not looked at)
    keys: list[int] | None = None  # the prompt's keys at this replica's block size, when looked at
    reason: str | None = None  # why kv chose it: one of ROUTING_REASONS (services/front/metrics.py)


# --- the scorers -------------------------------------------------------------------------------------


def cached_blocks(replica: Replica, prompt: Prompt, now: float) -> tuple[int, list[int] | None]:
    """The prompt's leading blocks this replica holds, and the prompt's keys there."""
    if replica.index is None or replica.block_size is None:
        return 0, None  # prefix caching off there: every token is new
    keys = prompt.keys(replica.block_size)
    return replica.index.cached_prefix(keys, now), keys


def cached_everywhere(replicas: list[Replica], prompt: Prompt, now: float) -> list[tuple[Replica, int, list[int] | None]]:
    """`cached_blocks` for every replica: what they report comes from one walk along the prompt's
    keys per fleet index and block size (FleetIndex.leading), each one's own predictions and
    history from there."""
    found: dict[int, tuple[int, list[int] | None]] = {}
    groups: dict[tuple[int, int], list[Replica]] = {}
    for replica in replicas:
        index = replica.index
        if index is not None and index.live and replica.block_size is not None:
            groups.setdefault((id(index.fleet), replica.block_size), []).append(replica)
        else:
            found[id(replica)] = cached_blocks(replica, prompt, now)
    for (_, block_size), group in groups.items():
        keys = prompt.keys(block_size)
        reported = group[0].index.fleet.leading(keys, [replica.index.bit for replica in group])
        for replica in group:
            found[id(replica)] = replica.index.cached_prefix(keys, now, reported.get(replica.index.bit, 0)), keys
    return [(replica, *found[id(replica)]) for replica in replicas]


def new_tokens(replica: Replica, prompt: Prompt, cached: int) -> int:
    return len(prompt.token_ids) - cached * (replica.block_size or 0)


def saturated(replica: Replica, weights: Weights) -> bool:
    load = replica.load
    return load is not None and (load.kv_usage >= weights.kv_saturation or load.waiting >= weights.queue_saturation)


def overloaded(active: int, least_active: int, weights: Weights) -> bool:
    """Far busier than the least loaded: a hot prefix's home hands its requests on before the
    inter-token latency of everything there suffers."""
    return active - least_active > weights.imbalance_requests and active > weights.imbalance_ratio * least_active


def kv_cost(replica: Replica, prompt: Prompt, cached: int, weights: Weights, active: int | None = None) -> float:
    """The engine work the request adds there, in prompt tokens: its own prefill, the prefill
    queued ahead of it, and the requests it would share each decode step with."""
    active = replica.active_requests if active is None else active
    return new_tokens(replica, prompt, cached) + replica.queued_prefill + weights.load_weight * active


def free_blocks(replica: Replica) -> int:
    """Blocks of its cache that hold no prefix it reported (at least 1)."""
    index = replica.index
    return max(1, index.capacity - len(index.held)) if index is not None else 1


def home(candidates: list[Replica], holders: list[Replica], prompt: Prompt, held_tokens: int,
         weights: Weights) -> tuple[Replica, int]:
    """The prompt's home, and its edge in tokens. Among the replicas holding the most of the
    prompt (`holders`, `held_tokens` each), a rendezvous hash of the prompt's anchor, weighted by
    free cache, so every front worker picks the same replica whatever order it sees them in:
    - held nowhere: the anchor is its first block, and requests that start alike meet (a burst on
      a new prefix, before any engine has announced it);
    - held by some replicas only: the anchor is the part they hold (its requests gather on one
      copy), and the edge that part's length;
    - held alike by every open replica: the anchor is that part plus one block, and the edge only
      the prompt's new part: what is held everywhere pulls nowhere.
    The edge is at most `home_tokens`."""
    step = min((replica.block_size for replica in candidates if replica.block_size), default=16)
    if held_tokens == 0:
        anchor_tokens, edge = min(len(prompt.token_ids), step), len(prompt.token_ids)
    elif len(holders) < len(candidates):
        anchor_tokens, edge = held_tokens, held_tokens
    else:
        anchor_tokens, edge = min(len(prompt.token_ids), held_tokens + step), len(prompt.token_ids) - held_tokens
    anchor = prompt.anchor(anchor_tokens)
    chosen = max(holders, key=lambda replica: rendezvous_score(anchor, replica.name, free_blocks(replica)))
    return chosen, min(edge, weights.home_tokens)


def rendezvous_score(anchor: bytes, name: str, weight: float) -> float:
    """Weighted rendezvous hashing: each name wins an anchor with a chance in proportion to its
    weight, and removing a name moves only the anchors it won."""
    mixed = _mix64(int.from_bytes(anchor[:8], "little") ^ _name_salt(name))
    return weight / -math.log((mixed + 0.5) / 2**64)  # the uniform draw in (0, 1)


@functools.lru_cache(maxsize=65536)
def _name_salt(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _mix64(value: int) -> int:
    """splitmix64's finalizer: every bit of the input moves about half the output's bits."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


# --- the policies -----------------------------------------------------------------------------------


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def in_turn(self, replicas: list[Replica]) -> list[Replica]:
        """The replicas, starting one further each call (how ties are broken)."""
        start = next(self._turn) % len(replicas)
        return replicas[start:] + replicas[:start]

    def choose(self, replicas: list[Replica], prompt: Prompt, now: float) -> Choice:
        replica = self.in_turn(replicas)[0]
        return Choice(replica, prompt.blocks(replica.block_size), 0)


class LeastLoaded(RoundRobin):
    name = "least-loaded"

    def choose(self, replicas: list[Replica], prompt: Prompt, now: float) -> Choice:
        replica = least_loaded(self.in_turn(replicas))
        return Choice(replica, prompt.blocks(replica.block_size), 0)


def least_loaded(replicas: list[Replica]) -> Replica:
    """The first of the least active (ties: fewer of this worker's requests, then order)."""
    return min(replicas, key=lambda replica: (replica.active_requests, replica.inflight))


class KvAware(RoundRobin):
    name = "kv"

    def __init__(self, weights: Weights = Weights()) -> None:
        super().__init__()
        self.weights = weights

    def choose(self, replicas: list[Replica], prompt: Prompt, now: float) -> Choice:
        in_turn = self.in_turn(replicas)
        active = {replica: replica.active_requests for replica in in_turn}
        open_ = [replica for replica in in_turn if not saturated(replica, self.weights)]
        if open_:
            least_active = min(active[replica] for replica in open_)
            open_ = [replica for replica in open_ if not overloaded(active[replica], least_active, self.weights)]
        opened = set(open_)
        guarded = [replica for replica in in_turn if replica not in opened]
        if not open_:  # every replica is full or queueing: spread
            replica = least_loaded(in_turn)
            cached, keys = cached_blocks(replica, prompt, now)
            choice = Choice(replica, prompt.blocks(replica.block_size), cached, keys)
            choice.reason = reason(choice, 0, held_tokens(guarded, prompt, now))
            return choice
        looked = cached_everywhere(open_, prompt, now)
        held = [cached * (replica.block_size or 0) for replica, cached, _ in looked]
        most = max(held)
        holders = [replica for (replica, _, _), tokens in zip(looked, held) if tokens == most]
        home_replica, edge = home(open_, holders, prompt, most, self.weights) if self.weights.home_tokens else (None, 0)
        best: tuple | None = None
        for replica, cached, keys in looked:
            cost = kv_cost(replica, prompt, cached, self.weights, active[replica]) - (edge if replica is home_replica else 0)
            rank = (cost, -cached, replica.inflight)
            if best is None or rank < best[0]:  # strictly lower: ties stay with the earlier in turn
                best = (rank, Choice(replica, prompt.blocks(replica.block_size), cached, keys))
        choice = best[1]
        choice.reason = reason(choice, most, held_tokens(guarded, prompt, now) if guarded else 0)
        return choice


def held_tokens(replicas: list[Replica], prompt: Prompt, now: float) -> int:
    """The most of the prompt, in tokens, that any of `replicas` holds (or is believed to): one walk
    along the prompt's keys for all of them (`cached_everywhere`), as for the open replicas."""
    return max((cached * (replica.block_size or 0) for replica, cached, _ in cached_everywhere(replicas, prompt, now)),
               default=0)


def reason(choice: Choice, open_most: int, guarded_most: int) -> str:
    """Why `choice` (one of ROUTING_REASONS), given the most of the prompt, in tokens, held by an open
    replica and by one a guard passed over."""
    chosen = choice.cached * (choice.replica.block_size or 0)
    if max(open_most, guarded_most) == 0:
        return "new"
    if chosen >= max(open_most, guarded_most):
        return "held"
    return "load" if open_most > chosen else "guarded"


def make_policy(name: str, weights: Weights = Weights()) -> RoundRobin:
    if name == "kv":
        return KvAware(weights)
    if name == "least-loaded":
        return LeastLoaded()
    if name == "round-robin":
        return RoundRobin()
    raise ValueError(f"PIPELINE_ROUTING={name!r}: give kv, least-loaded or round-robin")
