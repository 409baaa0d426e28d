"""Which ready replica takes a request: `PIPELINE_ROUTING` = `kv`, `least-loaded` or `round-robin`.

`kv` picks the replica with the lowest cost, in the spirit of NVIDIA Dynamo's KV router, in
prompt tokens of work:

    cost = new_tokens                        prefill: the prompt's tokens past the blocks it holds
         + load_weight x active_requests     load: its engine's running + waiting requests (its own
                                             report, so every front worker and PromptService replica
                                             counts), plus what this worker sent since that
                                             report and is still running, and never less than
                                             this worker's own in flight there

with two guards: a replica whose KV cache is nearly full (`kv_usage >= kv_saturation`) or whose
engine queues `queue_saturation` requests or more is passed over while another is not; when all
are, the request goes to the least loaded (spread: no prefix is worth a queue). Ties go to the
replica holding more of the prompt, then to the one with fewer of this worker's requests, then
in turn. Each scorer is a small function below, so the cost can be read and tested term by term.

The prompt's block keys are computed once per request and block size (services/kv_blocks.py:
about 0.3 ms for 2,048 tokens on the CI machine); every other step is a few lookups per replica.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from services.front.routing.replicas import Replica
from services.kv_blocks import block_keys


class Prompt:
    """A request's token ids and adapter, with its block keys per block size, computed once."""

    __slots__ = ("token_ids", "adapter", "_keys")

    def __init__(self, token_ids: Sequence[int], adapter: str | None = None) -> None:
        self.token_ids = token_ids
        self.adapter = adapter
        self._keys: dict[int, list[int]] = {}

    def keys(self, block_size: int) -> list[int]:
        keys = self._keys.get(block_size)
        if keys is None:
            keys = self._keys[block_size] = block_keys(self.token_ids, block_size, self.adapter)
        return keys

    def blocks(self, block_size: int | None) -> int:
        return len(self.token_ids) // block_size if block_size else 0


@dataclass(frozen=True)
class Weights:
    load_weight: float = 256.0  # prompt tokens to prefill that one active request weighs
    kv_saturation: float = 0.95  # kv_usage at or above which a replica is passed over
    queue_saturation: int = 8  # waiting requests at or above which a replica is passed over


@dataclass
class Choice:
    replica: Replica
    blocks: int  # the prompt's full blocks at this replica's block size
    cached: int  # of those, the ones the router believes the replica holds (0: not looked at)
    keys: list[int] | None = None  # the prompt's keys at this replica's block size, when looked at


# --- the scorers -------------------------------------------------------------------------------------


def cached_blocks(replica: Replica, prompt: Prompt, now: float) -> tuple[int, list[int] | None]:
    """The prompt's leading blocks this replica holds, and the prompt's keys there."""
    if replica.index is None or replica.block_size is None:
        return 0, None  # prefix caching off there: every token is new
    keys = prompt.keys(replica.block_size)
    return replica.index.cached_prefix(keys, now), keys


def new_tokens(replica: Replica, prompt: Prompt, cached: int) -> int:
    return len(prompt.token_ids) - cached * (replica.block_size or 0)


def saturated(replica: Replica, weights: Weights) -> bool:
    load = replica.load
    return load is not None and (load.kv_usage >= weights.kv_saturation or load.waiting >= weights.queue_saturation)


def kv_cost(replica: Replica, prompt: Prompt, cached: int, weights: Weights) -> float:
    return new_tokens(replica, prompt, cached) + weights.load_weight * replica.active_requests


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
        open_ = [replica for replica in in_turn if not saturated(replica, self.weights)]
        if not open_:  # every replica is full or queueing: spread
            replica = least_loaded(in_turn)
            cached, keys = cached_blocks(replica, prompt, now)
            return Choice(replica, prompt.blocks(replica.block_size), cached, keys)
        best: tuple | None = None
        for replica in open_:
            cached, keys = cached_blocks(replica, prompt, now)
            rank = (kv_cost(replica, prompt, cached, self.weights), -cached, replica.inflight)
            if best is None or rank < best[0]:  # strictly lower: ties stay with the earlier in turn
                best = (rank, Choice(replica, prompt.blocks(replica.block_size), cached, keys))
        return best[1]


def make_policy(name: str, weights: Weights = Weights()) -> RoundRobin:
    if name == "kv":
        return KvAware(weights)
    if name == "least-loaded":
        return LeastLoaded()
    if name == "round-robin":
        return RoundRobin()
    raise ValueError(f"PIPELINE_ROUTING={name!r}: give kv, least-loaded or round-robin")
