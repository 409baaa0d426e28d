"""A replica's KV cache as block keys: what its engine holds, what its requests are about to
store (pending), and whether the index may miss blocks (degraded).

`KvIndex` takes vLLM's KV events (decoded msgpack: dicts with a `type`) and the pending keys of
the requests the replica accepted, and gives each change as one `CacheEvents` frame
(`take_change`) or the whole state (`snapshot`). It runs in the replica's KV indexer process only
(services/gpu/kv_indexer.py); no I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

from services.kv_blocks import block_keys
from services.protocol import CacheEvents

# The storage tiers an engine's own prefix cache lives in (offloaded copies are not hits).
OWN_MEDIA = (None, "GPU")


class KvIndex:
    """vLLM block hash -> (our key, copies), key -> hashes that give it, key -> requests waiting
    on it; a key is pending while a request waits on it and no block of the engine holds it.

    `degraded`: the index may miss blocks the engine holds. It turns on when batches of events were
    lost (`start_over`) and off when the engine drops every block (AllBlocksCleared), or once the
    index has taken as many blocks as the engine's cache has (`capacity`) since: by then the
    engine has stored a cache's worth anew (a block hot since before the loss is the exception:
    docs/architecture.md, "KV events: one indexer per replica")."""

    def __init__(self, capacity: int | None = None,
                 adapter_name: Callable[[int], str | None] = lambda lora_id: None) -> None:
        self.capacity = capacity
        self._adapter_name = adapter_name
        self._blocks: dict[Hashable, list[int]] = {}  # vLLM hash -> [key, copies]
        self._held: dict[int, int] = {}  # key -> vLLM hashes that give it
        self._waiting: dict[int, int] = {}  # key -> requests waiting on it
        self._requests: dict[str, tuple[Sequence[int], float]] = {}  # request -> (keys, since), oldest first
        self.degraded = False
        self._taken_since_loss = 0
        # the change since the last take_change: each key touched, held / pending before it
        self._cleared = False
        self._held_before: dict[int, bool] = {}
        self._pending_before: dict[int, bool] = {}
        self._degraded_before = False

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self) -> list[int]:
        return list(self._held)

    def pending_keys(self) -> list[int]:
        return [key for key in self._waiting if key not in self._held]

    def is_pending(self, key: int) -> bool:
        return key in self._waiting and key not in self._held

    @property
    def requests(self) -> int:
        return len(self._requests)

    # --- the engine's events ---------------------------------------------------------------------

    def apply(self, events: Iterable[dict]) -> None:
        """One batch of vLLM's events (BlockStored, BlockRemoved, AllBlocksCleared; others are skipped)."""
        for event in events:
            kind = event.get("type")
            if kind == "AllBlocksCleared":
                self._drop_all()
                self.degraded = False  # what the engine holds from now on, the index hears of
            elif kind == "BlockStored" and self._own(event):
                self._store(event)
            elif kind == "BlockRemoved" and self._own(event):
                self._remove(event["block_hashes"])

    def start_over(self) -> None:
        """Batches of events were lost: what the engine held then is unknown from now on."""
        self._drop_all()
        self.degraded, self._taken_since_loss = True, 0

    @staticmethod
    def _own(event: dict) -> bool:
        return event.get("medium") in OWN_MEDIA and event.get("group_idx") in (None, 0)

    def _drop_all(self) -> None:
        self._blocks.clear()
        self._held.clear()
        self._cleared = True
        self._held_before.clear()
        self._pending_before.clear()

    def _touch(self, key: int) -> None:
        """Note the key's state before this change (once per change)."""
        if key not in self._held_before:
            self._held_before[key] = key in self._held
            self._pending_before[key] = key in self._waiting and key not in self._held

    def _store(self, event: dict) -> None:
        parent_hash = event.get("parent_block_hash")
        if parent_hash is None:
            parent = None
        elif parent_hash in self._blocks:
            parent = self._blocks[parent_hash][0]
        else:
            return  # its chain is unknown here (after a loss): left out, never guessed
        adapter = event.get("lora_name")
        if adapter is None and event.get("lora_id") is not None:
            adapter = self._adapter_name(event["lora_id"])
            if adapter is None:
                return  # an adapter this replica no longer knows by name
        keys = block_keys(event["token_ids"], event["block_size"], adapter, parent=parent)
        for block_hash, key in zip(event["block_hashes"], keys):
            entry = self._blocks.get(block_hash)
            if entry is not None:
                entry[1] += 1
                continue
            self._touch(key)
            self._blocks[block_hash] = [key, 1]
            self._held[key] = self._held.get(key, 0) + 1
        if self.degraded:
            self._taken_since_loss += len(keys)
            if self.capacity is not None and self._taken_since_loss >= self.capacity:
                self.degraded = False

    def _remove(self, block_hashes: Iterable[Hashable]) -> None:
        for block_hash in block_hashes:
            entry = self._blocks.get(block_hash)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] > 0:
                continue
            key = entry[0]
            self._touch(key)
            del self._blocks[block_hash]
            self._held[key] -= 1
            if self._held[key] == 0:
                del self._held[key]

    # --- the requests' pending keys --------------------------------------------------------------

    def wait(self, request: str, keys: Sequence[int], now: float) -> None:
        """`request` (accepted by the replica) will store `keys` (its prompt's full blocks)."""
        self.done(request)
        self._requests[request] = (keys, now)
        for key in keys:
            self._touch(key)
            self._waiting[key] = self._waiting.get(key, 0) + 1

    def done(self, request: str) -> None:
        """`request` ended (finished, aborted, refused): it waits on nothing any more."""
        keys, _ = self._requests.pop(request, ((), 0.0))
        for key in keys:
            self._touch(key)
            left = self._waiting[key] - 1
            if left:
                self._waiting[key] = left
            else:
                del self._waiting[key]

    def expire(self, older_than: float) -> None:
        """End the requests announced before `older_than` (their end was never heard: a lost message)."""
        while self._requests:
            request, (_, since) = next(iter(self._requests.items()))
            if since >= older_than:
                return
            self.done(request)

    # --- frames ----------------------------------------------------------------------------------

    def take_change(self) -> CacheEvents | None:
        """The change since the last call, as one frame (None: nothing changed). After a clear it
        is the whole state (`cleared`, every key held, every key pending)."""
        if self._cleared:
            frame = CacheEvents(cleared=True, stored=self.keys(), pending=self.pending_keys(), degraded=self.degraded)
        else:
            held, waiting = self._held, self._waiting
            stored = [key for key, was in self._held_before.items() if not was and key in held]
            removed = [key for key, was in self._held_before.items() if was and key not in held]
            pending = [key for key, was in self._pending_before.items() if not was and key in waiting and key not in held]
            unpending = [key for key, was in self._pending_before.items() if was and (key not in waiting or key in held)]
            changed = stored or removed or pending or unpending or self.degraded != self._degraded_before
            frame = CacheEvents(removed=removed, stored=stored, unpending=unpending, pending=pending,
                                degraded=self.degraded) if changed else None
        self._cleared = False
        self._held_before.clear()
        self._pending_before.clear()
        self._degraded_before = self.degraded
        return frame

    def snapshot(self, epoch: str | None) -> CacheEvents:
        """The whole state, as a stream's first frame (call `take_change` first: changes not yet
        taken would be in it and then again in the next change)."""
        return CacheEvents(cleared=True, epoch=epoch, stored=self.keys(), pending=self.pending_keys(),
                           degraded=self.degraded)
