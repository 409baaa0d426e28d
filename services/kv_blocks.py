"""The name of a block of KV cache, the same in both tiers: the key the front tier routes by and
the key the GPU tier reports its engine's cache in.

vLLM's prefix cache holds a prompt's KV in blocks of `block_size` tokens, and a block is reused
only when every token before it is the same, and so is the LoRA adapter. So a block's key is
chained: the first hashes the adapter's name and the first `block_size` token ids, each next one
hashes its parent's key and its own tokens. Only full blocks have a key (the engine caches no
partial block). A prompt then names its blocks as a list, and "the first k of them are cached on
that replica" is one walk along it.

The project's own hash, not vLLM's: vLLM's block hash is seeded per process (`PYTHONHASHSEED`,
`sha256_cbor` with a random seed in 0.26), so it means nothing to another process. LLMService
recomputes these keys from the token ids that vLLM's `BlockStored` events carry
(services/gpu/kv_events.py), and PromptService from the prompts it tokenized
(services/front/routing/). BLAKE2b (the standard library's) with 8-byte digests, masked to 63
bits so a key is a non-negative JSON integer in every language: a collision among the blocks of
one replica costs one mis-predicted cache hit, nothing more.
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
