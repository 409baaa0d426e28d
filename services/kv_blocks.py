"""The key of a block of KV cache, computed the same in both tiers: the front tier routes by it,
the GPU tier reports its engine's cache in it.

Keys are chained: the first block's hashes the adapter's name and its token ids, each next one its
parent's key and its own tokens; only full blocks have one. The project's own hash (BLAKE2b, 63
bits), not vLLM's, which is seeded per process (docs/architecture.md, "Block keys").
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

KEY_MASK = (1 << 63) - 1


def root_key(adapter: str | None) -> int:
    """The chain's start: the adapter's name (the base model has none)."""
    return _key(f"adapter:{adapter or ''}".encode())


def block_keys(token_ids: Sequence[int], block_size: int, adapter: str | None = None,
               parent: int | None = None) -> list[int]:
    """The keys of the full blocks of `token_ids`, first block first: a prompt's blocks, or (given
    `parent`, the key of the block before them) blocks that continue a chain, as vLLM's
    `BlockStored` events report them. Tokens after the last full block have no key."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    key = root_key(adapter) if parent is None else parent
    tokens = struct.pack(f"<{len(token_ids)}I", *token_ids)  # token ids are below 2**32 (a vocabulary index)
    step = block_size * 4
    keys: list[int] = []
    for start in range(0, (len(token_ids) // block_size) * step, step):
        key = _key(key.to_bytes(8, "little") + tokens[start:start + step])
        keys.append(key)
    return keys


def _key(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & KEY_MASK
