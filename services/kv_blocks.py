"""The key of a block of KV cache, computed the same in both tiers: the front tier routes by it,
the GPU tier reports its engine's cache in it.

A block's key is a hash of everything up to its end: the adapter's name and every token id before
it (two polynomial hashes modulo 2**31 - 1, one key of 62 bits), so keys chain (a block's key and
its own tokens give the next) and a prompt's keys come from one vectorized pass. Only full blocks
have one. The project's own hash, not vLLM's, which is seeded per process (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

PRIME = (1 << 31) - 1
KEY_MASK = (1 << 62) - 1  # every key is a non-negative integer below 2**62
SHORT = 128  # tokens up to which a plain loop beats the vectorized pass (an engine event's few blocks)
BASES = (1_000_000_007 % PRIME, 998_244_353 % PRIME)  # any two distinct bases in [2, PRIME)
_powers: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # base -> (base**i, base**-i) mod PRIME, i = 0..n


def root_key(adapter: str | None) -> int:
    """The chain's start: the adapter's name (the base model has none)."""
    digest = hashlib.blake2b(f"adapter:{adapter or ''}".encode(), digest_size=8).digest()
    high, low = struct.unpack("<II", digest)
    return ((high % PRIME) << 31) | (low % PRIME)


def block_keys(token_ids: Sequence[int], block_size: int, adapter: str | None = None,
               parent: int | None = None) -> list[int]:
    """The keys of the full blocks of `token_ids`, first block first: a prompt's blocks, or (given
    `parent`, the key of the block before them) blocks that continue a chain, as vLLM's
    `BlockStored` events report them. Tokens after the last full block have no key."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    length = len(token_ids) // block_size * block_size
    if length == 0:
        return []
    start = root_key(adapter) if parent is None else parent
    if length <= SHORT:
        return _keys_one_by_one(token_ids[:length], block_size, start)
    tokens = np.frombuffer(struct.pack(f"<{length}I", *token_ids[:length]), dtype="<u4").astype(np.int64) + 1
    ends = np.arange(block_size - 1, length, block_size)
    high = _chain(tokens, ends, start >> 31, BASES[0])
    low = _chain(tokens, ends, start & PRIME, BASES[1])
    return ((high << 31) | low).tolist()


def _keys_one_by_one(token_ids: Sequence[int], block_size: int, start: int) -> list[int]:
    high, low = start >> 31, start & PRIME
    base_high, base_low = BASES
    keys = []
    for begin in range(0, len(token_ids), block_size):
        for token in token_ids[begin:begin + block_size]:
            high, low = (high * base_high + token + 1) % PRIME, (low * base_low + token + 1) % PRIME
        keys.append((high << 31) | low)
    return keys


def _chain(tokens: np.ndarray, ends: np.ndarray, start: int, base: int) -> np.ndarray:
    """h(prefix of length L) = (start * base**L + sum_j tokens[j] * base**(L-1-j)) mod PRIME at
    each block's end: base**L * (start + sum_j tokens[j] * base**-(j+1)), one cumulative sum.
    Every product stays under 2**62 and the sum under 2**52 for prompts up to 2**21 tokens."""
    power, inverse = _power_tables(base, len(tokens))
    sums = np.cumsum(tokens * inverse[1:len(tokens) + 1] % PRIME)[ends] % PRIME
    return power[ends + 1] * ((sums + start) % PRIME) % PRIME


def _power_tables(base: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """base**i and base**-i modulo PRIME for i up to `length` (grown by doubling, kept)."""
    tables = _powers.get(base)
    if tables is None or len(tables[0]) <= length:
        size = max(4096, 1 << length.bit_length())
        power, inverse = np.empty(size + 1, dtype=np.int64), np.empty(size + 1, dtype=np.int64)
        step, back = base, pow(base, PRIME - 2, PRIME)
        value = value_back = 1
        for i in range(size + 1):  # once per process and size: about 0.1 s for a million tokens
            power[i], inverse[i] = value, value_back
            value, value_back = value * step % PRIME, value_back * back % PRIME
        tables = _powers[base] = (power, inverse)
    return tables
