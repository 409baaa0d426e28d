"""Every setting of the pipeline, in one pydantic object read once from the environment.

Each field has an environment twin, `PIPELINE_<FIELD>` (for example `PIPELINE_MAX_MODEL_LEN=4096`);
docs/configuration.md lists them all. Both tiers read the same settings, so the limits the front
tier enforces are the limits the engine was built with.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIPELINE_", frozen=True, extra="ignore")

    # --- the model -------------------------------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL,
        description="A BentoML model-store tag (the default, made by scripts/prepare_model.py), "
        "a Hugging Face id such as meta-llama/Llama-2-7b-chat-hf, or a local folder.",
    )
    served_model_name: str | None = Field(
        None, description="The name clients use in the OpenAI `model` field; defaults to `model`."
    )

    # --- the engine (LLMService) -------------------------------------------------------------
    dtype: str = Field("auto", description="vLLM dtype: auto, bfloat16, float16 or float32.")
    max_model_len: int | None = Field(
        None, ge=16, description="Context length (prompt + output tokens); unset means the model's own."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine; also the GPU count LLMService asks for.")
    enforce_eager: bool | None = Field(
        None, description="Skip torch.compile and CUDA graphs; unset means eager on CPU, compiled on GPU."
    )
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences per engine step; unset means vLLM's default.")
    enable_prefix_caching: bool | None = Field(None, description="Unset means vLLM's default.")
    cpu_kvcache_space_gib: int = Field(
        2, ge=1, description="KV-cache size on CPU (sets VLLM_CPU_KVCACHE_SPACE unless it is set)."
    )
    load_format: str = Field("auto", description="vLLM load format; `dummy` gives random weights for speed tests.")

    # --- the front tier (PromptService) ----------------------------------------------------------
    prompt_workers: int | Literal["cpu_count"] = Field(
        "cpu_count", description="PromptService worker processes."
    )
    chat_template: str = Field(
        "model",
        description="`model` (the model's own chat template), a named template from "
        "services/text/chat_templates/ (llama2, plain), or a path to a Jinja template file.",
    )
    default_max_tokens: int = Field(1024, ge=1, description="max_tokens when a request gives none (the seed's MAX_TOKENS).")
    request_timeout_s: float = Field(300, gt=0, description="Longest a request may take (the seed's traffic timeout).")

    @field_validator("prompt_workers", mode="before")
    @classmethod
    def _workers_from_env(cls, value: object) -> object:
        return int(value) if isinstance(value, str) and value.isdigit() else value

    @property
    def model_name(self) -> str:
        """The name the API reports and checks."""
        return self.served_model_name or self.model

    @cached_property
    def model_path(self) -> str:
        """Where the model's files are: a local folder, resolved once per process."""
        from services.model_store import resolve_model_path

        return resolve_model_path(self.model)

    @cached_property
    def hf_config(self) -> dict:
        return json.loads((Path(self.model_path) / "config.json").read_text())

    @property
    def context_length(self) -> int:
        """The limit on prompt + max_tokens: the configured one, or the model's own."""
        own = self.hf_config.get("max_position_embeddings") or self.hf_config.get("max_sequence_length")
        if self.max_model_len is not None:
            return self.max_model_len
        if own is None:
            raise ValueError("the model's config.json gives no max_position_embeddings: set PIPELINE_MAX_MODEL_LEN")
        return int(own)


def load_settings() -> Settings:
    return Settings()


settings = load_settings()


def is_cpu_build() -> bool:
    """True where the installed engine is vllm-cpu (development and CI machines)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return os.environ.get("VLLM_TARGET_DEVICE") == "cpu"
