"""Shared fixtures: the default model's tokenizer (from the BentoML model store)."""

from __future__ import annotations

import pytest

from services.config import settings
from services.front.text.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def model_path() -> str:
    return settings.model_path


@pytest.fixture(scope="session")
def tokenizer(model_path: str):
    return load_tokenizer(model_path)
