"""Block keys (services/kv_blocks.py): the same on both tiers for the same tokens and adapter,
chained so that a key names its whole prefix, and only for full blocks."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from services.kv_blocks import BASES, KEY_MASK, PRIME, SHORT, block_keys, root_key

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [random.Random(7).randrange(49152) for _ in range(1000)]


def test_only_full_blocks_have_keys() -> None:
    assert len(block_keys(PROMPT, 128)) == 7
    assert block_keys(PROMPT[:127], 128) == []
    assert len(block_keys(PROMPT, 16)) == 62


def test_a_key_names_its_whole_prefix() -> None:
    """Two prompts share keys exactly as long as they share whole blocks of tokens."""
    other = PROMPT[:300] + [1] + PROMPT[301:]  # differs in block 2 (tokens 256..383)
    mine, theirs = block_keys(PROMPT, 128), block_keys(other, 128)
    assert mine[:2] == theirs[:2]
    assert all(a != b for a, b in zip(mine[2:], theirs[2:])), "a changed block changes every key after it"


def test_the_adapter_is_part_of_every_key() -> None:
    base, lora = block_keys(PROMPT, 128), block_keys(PROMPT, 128, adapter="sql-lora")
    assert not set(base) & set(lora)
    assert block_keys(PROMPT, 128, adapter="sql-lora") == lora


def test_a_chain_continues_from_its_parent_as_engine_events_report_it() -> None:
    """vLLM's BlockStored carries a parent block and the new blocks' tokens: continuing from the
    parent's key gives the keys the prompt's own walk gives."""
    whole = block_keys(PROMPT, 128)
    assert block_keys(PROMPT[256:896], 128, parent=whole[1]) == whole[2:7]


def test_keys_are_the_same_in_another_process() -> None:
    """Not Python's per-process hash: a fresh interpreter (another tier) computes the same keys."""
    code = ("import random; from services.kv_blocks import block_keys; "
            "print(block_keys([random.Random(7).randrange(49152) for _ in range(1000)], 128, 'a'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.stdout.strip() == str(block_keys(PROMPT, 128, "a"))


def test_keys_are_non_negative_62_bit_integers() -> None:
    assert all(0 <= key <= KEY_MASK for key in block_keys(PROMPT, 16))


def reference_keys(token_ids: list[int], block_size: int, adapter: str | None = None) -> list[int]:
    """The definition, token by token: each of the two hashes is start * base**L + the prompt's
    (token id + 1)s as the digits of a number in that base, modulo PRIME."""
    start = root_key(adapter)
    hashes = [start >> 31, start & PRIME]
    keys = []
    for position, token in enumerate(token_ids, 1):
        hashes = [(h * base + token + 1) % PRIME for h, base in zip(hashes, BASES)]
        if position % block_size == 0:
            keys.append((hashes[0] << 31) | hashes[1])
    return keys


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_the_vectorized_keys_are_the_definitions(block_size: int) -> None:
    assert block_keys(PROMPT, block_size, "a") == reference_keys(PROMPT, block_size, "a")
    assert block_keys(PROMPT[:SHORT], block_size, "a") == reference_keys(PROMPT[:SHORT], block_size, "a")
    extremes = [0, 2**32 - 1, 1, 2**31 - 1, 2**31, 2**31 + 1] * 40  # any uint32 token id
    assert block_keys(extremes, block_size) == reference_keys(extremes, block_size)


def test_a_long_prompt_grows_the_tables_and_keeps_its_keys() -> None:
    long = PROMPT * 40  # 40,000 tokens: past the first tables
    keys = block_keys(long, 16)
    assert keys[:62] == block_keys(PROMPT, 16) and len(keys) == 2500 and len(set(keys)) == 2500


def test_a_block_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_keys(PROMPT, 0)
