"""The LoRA adapters as configured (`PIPELINE_LORA_MODULES`, vLLM's `--lora-modules`): what the
settings of both tiers parse and check at start-up. Serving them (ids, folders, run-time loads)
is the GPU tier's work: services/gpu/lora.py.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field


class LoraModule(BaseModel):
    """One adapter: the name clients use in `model`, where its files are, and its base model."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1, description="a folder, a BentoML model-store tag, or a Hugging Face id")
    base_model_name: str | None = None


def parse_lora_modules(value: str | list | None) -> list[LoraModule]:
    """`PIPELINE_LORA_MODULES` as vLLM's `--lora-modules` takes it: `name=path` items separated by
    spaces or commas, or JSON objects `{"name": ..., "path": ..., "base_model_name": ...}` (one
    object, or a JSON list of them)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [item if isinstance(item, LoraModule) else _one_module(item) for item in value]
    text = value.strip()
    if not text:
        return []
    if text[0] in "[{":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"PIPELINE_LORA_MODULES is not valid JSON: {error}") from error
        return [_one_module(item) for item in (parsed if isinstance(parsed, list) else [parsed])]
    return [_one_module(item) for item in text.replace(",", " ").split()]


def _one_module(item: object) -> LoraModule:
    if isinstance(item, dict):
        return LoraModule.model_validate(item)
    if isinstance(item, str) and "=" in item:
        name, _, path = item.partition("=")
        if name.strip() and path.strip():
            return LoraModule(name=name.strip(), path=path.strip())
    raise ValueError(f"a LoRA module must be `name=path` or a JSON object with name and path; got {item!r}")


def check_lora_modules(modules: list[LoraModule], base_model_name: str) -> None:
    """Refuse at start-up what vLLM's server refuses: two adapters of one name, or one named as
    the base model."""
    seen: set[str] = set()
    for module in modules:
        if module.name == base_model_name:
            raise ValueError(f"the LoRA adapter {module.name!r} conflicts with the served base model's name")
        if module.name in seen:
            raise ValueError(f"the LoRA adapter name {module.name!r} appears twice in PIPELINE_LORA_MODULES")
        seen.add(module.name)
