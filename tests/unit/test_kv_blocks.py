"""Block keys (services/kv_blocks.py): the same on both tiers for the same tokens and adapter,
chained so that a key names its whole prefix, and only for full blocks."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from services.kv_blocks import KEY_MASK, block_keys

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


def test_keys_are_non_negative_63_bit_integers() -> None:
    assert all(0 <= key <= KEY_MASK for key in block_keys(PROMPT, 16))


def test_a_block_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_keys(PROMPT, 0)
