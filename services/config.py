"""Every setting of the pipeline, in one pydantic object read once from the environment.

Each field has an environment twin, `PIPELINE_<FIELD>` (for example `PIPELINE_MAX_MODEL_LEN=4096`);
docs/configuration.md lists them all. Both tiers read the same settings, so the limits the front
tier enforces are the limits the engine was built with.
"""

from __future__ import annotations

import json
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.lora_modules import LoraModule, check_lora_modules, parse_lora_modules

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
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="vLLM's --kv-cache-memory-bytes: the GPU KV cache's size in bytes, set instead of measured "
        "(no memory profiling at start-up, so several engines can share one GPU); unset means what "
        "gpu_memory_utilization leaves. Not used on CPU (cpu_kvcache_space_gib)."
    )
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
    engine_clients: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="LLMService worker processes, each an engine client of the one engine (as `vllm serve "
        "--api-server-count`): past one process, the Python between the engine and the streams is spread over several "
        "cores. Worker 1 launches the engine; the others connect to it (docs/architecture.md). `auto`: 1 on the CPU "
        "engine, else half the CPUs this process may run on, up to 8 (8 was the best measured on a 16-core H200 host).",
    )
    cache_dir: str | None = Field(
        None, description="One folder for the engine's compile and kernel caches (sets VLLM_CACHE_ROOT, "
        "TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, FLASHINFER_WORKSPACE_BASE and CUDA_CACHE_PATH under it, unless "
        "they are set): on a volume that outlives the replica, a new replica reuses what an earlier one compiled. "
        "Unset means each library's own default (mostly under ~/.cache and /tmp).",
    )
    engine_start_timeout_s: float = Field(
        1800, gt=0, description="How long LLMService workers 2.. wait for worker 1 to start the engine."
    )
    kv_events: bool = Field(
        True, description="Turn on vLLM's KV cache events (when prefix caching is on) and serve them, as block keys, "
        "on LLMService's /kv_events for the front tier's routing. The engine publishes them on a Unix socket in the "
        "replica's run directory; no port is opened."
    )
    drain_timeout_s: int = Field(
        330, ge=0, description="How long an LLMService worker told to stop (SIGTERM) waits for the requests under way "
        "to finish before it stops anyway (also the engine's own --shutdown-timeout). Meanwhile it is not ready and "
        "refuses new work with 503."
    )

    # --- LoRA adapters (services/lora_modules.py, served by services/gpu/lora.py) ---------------------------------------------------------
    lora_modules: Annotated[list[LoraModule], NoDecode] = Field(
        default_factory=list, description="vLLM's --lora-modules: adapters served next to the base model, `name=path` "
        "items separated by spaces or commas (a path may be a BentoML model-store tag), or JSON objects with name, "
        "path and base_model_name. Clients pick one with the OpenAI `model` field."
    )
    max_loras: int = Field(1, ge=1, description="vLLM's --max-loras: adapters in one engine batch.")
    max_lora_rank: int = Field(16, ge=1, description="vLLM's --max-lora-rank: the largest adapter rank the engine takes "
                               "(one of vLLM's sizes: 1, 8, 16, 32, 64, 128, 256, 320, 512).")
    max_cpu_loras: int | None = Field(None, ge=1, description="vLLM's --max-cpu-loras: adapters kept in CPU memory; "
                                      "unset means max_loras.")
    allow_runtime_lora_updating: bool = Field(
        False, description="vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: serve /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter (per replica; behind the API keys when set). Also turns LoRA on in the engine."
    )
    lora_registry_path: str | None = Field(
        None, description="The JSON file in which LLMService's workers share the adapter name -> id map of one engine "
        "(runtime loads); unset means a file in the replica's run directory (PIPELINE_ENGINE_RUN_DIR), new at each start."
    )

    # --- the front tier (PromptService) ----------------------------------------------------------
    prompt_workers: int | Literal["cpu_count"] = Field(
        "cpu_count", description="PromptService worker processes."
    )
    spread_connections: bool = Field(
        True, description="End a connection after each generation response (`Connection: close`) when the service has "
        "several workers (PromptService's workers; LLMService's engine clients), so that the client's next request "
        "goes to whichever worker accepts it first. The workers share one accept queue, and kept-alive connections "
        "opened in a burst would stay with the one worker that accepted them (docs/architecture.md, \"The front door\")."
    )
    chat_template: str = Field(
        "model",
        description="`model` (the model's own chat template), a named template from "
        "services/front/text/chat_templates/ (llama2, plain, hermes: ChatML that renders `tools` for hermes tool calling), "
        "or a path to a Jinja template file.",
    )
    enable_auto_tool_choice: bool = Field(
        False, description="vLLM's --enable-auto-tool-choice: accept `tools` and let the model decide when to call "
        "them (tool_choice auto); needs `tool_call_parser`."
    )
    tool_call_parser: str | None = Field(
        None, description="vLLM's --tool-call-parser: the vLLM tool parser that reads tool calls out of the model's text "
        "(e.g. `hermes`); needs a chat template that renders `tools` (`chat_template`)."
    )
    tool_parser_plugin: str | None = Field(
        None, description="vLLM's --tool-parser-plugin: a Python file that registers a tool parser to name in "
        "`tool_call_parser`."
    )
    reasoning_parser: str | None = Field(
        None, description="vLLM's --reasoning-parser (e.g. `deepseek_r1`, `qwen3`): splits `reasoning` from `content` "
        "in chat answers; the engine starts a grammar after the reasoning ends."
    )
    default_max_tokens: int = Field(1024, ge=1, description="max_tokens when a request gives none (the seed's MAX_TOKENS).")
    generation_config: Literal["auto", "vllm"] = Field(
        "auto",
        description="`auto`: sampling fields an OpenAI request leaves unset take the model's generation_config.json "
        "values (temperature, top_p, top_k, min_p, repetition_penalty), as `vllm serve` does; `vllm`: vLLM's defaults.",
    )
    request_timeout_s: float = Field(
        300, gt=0, description="Deadline of one request from the moment its prompt goes to the GPU tier; when it passes, "
        "the engine request is aborted and the client gets a 504 (or an error event in a started stream)."
    )

    # --- fail-safety: limits, admission, access (docs/operations.md) ----------------------------
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body the front tier reads (413 above).")
    max_inflight_sequences: int | None = Field(
        256, ge=1, description="Engine sequences one PromptService worker holds at once (each request charges its "
        "prompts x n until its last byte is sent); beyond it new requests get 429 with Retry-After. Unset means no cap."
    )
    max_sequences_per_request: int = Field(
        256, ge=1, description="Most engine sequences (prompts x n) one request may start; a request asking for more "
        "is refused with 400."
    )
    max_streams_per_request: int = Field(
        32, ge=1, description="GPU-tier streams one request keeps open at once (one per prompt of a batched "
        "/v1/completions request); further prompts wait for a stream to end."
    )
    max_engine_requests: int | None = Field(
        1024, ge=1, description="Requests the engine holds at once (running plus queued); beyond it LLMService "
        "answers 429 and the front passes it on with Retry-After. Unset means no cap."
    )
    retry_after_s: int = Field(1, ge=1, description="The Retry-After (seconds) sent with 429 and 503 refusals.")
    tier_check_interval_s: float = Field(
        1.0, gt=0, description="How often PromptService checks the GPU tier's /readyz; while it is not ready, "
        "generation requests get 503 at once."
    )
    # --- several GPU-tier replicas (services/front/routing/, docs/architecture.md "Routing") --------
    gpu_tier_replicas: str | None = Field(
        None, description="Where PromptService finds LLMService's replicas: unset means the one address bentoml.depends "
        "gives; `http://a:3000,http://b:3000` a fixed list; `dns://NAME:PORT` the A/AAAA records of a headless Service; "
        "`file:///path` one URL a line, read again when it changes; `bentocloud` BentoML's get_hosts()."
    )
    gpu_tier_refresh_s: float = Field(5.0, gt=0, description="How often the replicas are discovered again.")
    routing: Literal["kv", "least-loaded", "round-robin"] = Field(
        "kv", description="How a request picks a replica: `kv` (the lowest cost of prefill and load), `least-loaded` "
        "or `round-robin`. Used only with gpu_tier_replicas."
    )
    routing_load_weight: float = Field(
        256.0, ge=0, description="kv routing: how many prompt tokens to prefill one active request on a replica weighs "
        "(the decode steps it shares with a new request)."
    )
    routing_kv_saturation: float = Field(
        0.95, gt=0, le=1, description="kv routing: a replica whose KV-cache usage is at or above this is passed over "
        "while another is not."
    )
    routing_queue_saturation: int = Field(
        8, ge=1, description="kv routing: a replica whose engine has this many requests waiting or more is passed "
        "over while another is not."
    )
    routing_imbalance_requests: int = Field(
        32, ge=0, description="kv routing: a replica with this many more active requests than the least loaded one, "
        "and routing_imbalance_ratio times as many, is passed over, whatever it holds: a hot prefix spreads to "
        "another replica before the inter-token latency at its home suffers."
    )
    routing_imbalance_ratio: float = Field(
        1.5, ge=1, description="kv routing: see routing_imbalance_requests."
    )
    routing_home_tokens: int = Field(
        2048, ge=0, description="kv routing: every front worker sends a prompt to the same replica, its home (a "
        "rendezvous hash, weighted by free cache, of the part of the prompt the replicas hold, or of its first block "
        "when none holds any), whose cost is lowered by the prompt's part that is not held everywhere, up to this many "
        "tokens; 0 turns the home off."
    )
    trace_streams: bool = Field(
        False, description="Let BentoML's OpenTelemetry middleware trace the streaming routes too. It opens a span for "
        "every streamed chunk (about 80 us of CPU each), so they are left out unless this is set; they still show "
        "in the access log and the metrics."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False, description="Bearer tokens the front door accepts (comma-separated in the environment); "
        "empty means no authentication. Health and metrics endpoints are exempt."
    )

    internal_token: SecretStr = Field(
        repr=False, description="The shared secret the front tier sends LLMService (`Authorization: Bearer ...`); "
        "LLMService refuses every call without it (401) except health and metrics. Unset: `bentoml serve` makes "
        "one for its run; tiers started separately (one container per tier) must be given the same value.",
    )

    @field_validator("internal_token")
    @classmethod
    def _strong_token(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("PIPELINE_INTERNAL_TOKEN must be at least 16 characters long")
        return value

    @model_validator(mode="after")
    def _request_fits_budget(self) -> Settings:
        budget = self.max_inflight_sequences
        if budget is not None and self.max_sequences_per_request > budget:
            raise ValueError(
                f"PIPELINE_MAX_SEQUENCES_PER_REQUEST ({self.max_sequences_per_request}) exceeds "
                f"PIPELINE_MAX_INFLIGHT_SEQUENCES ({budget}): such a request could never be admitted"
            )
        return self

    @model_validator(mode="after")
    def _tools_need_a_parser(self) -> Settings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("PIPELINE_ENABLE_AUTO_TOOL_CHOICE needs PIPELINE_TOOL_CALL_PARSER (vLLM: "
                             "--enable-auto-tool-choice requires --tool-call-parser)")
        return self

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _lora_modules_from_env(cls, value: object) -> object:
        return parse_lora_modules(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _adapters_named_apart(self) -> Settings:
        check_lora_modules(self.lora_modules, self.model_name)
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"PIPELINE_MAX_CPU_LORAS ({self.max_cpu_loras}) must not be below PIPELINE_MAX_LORAS "
                             f"({self.max_loras}) (vLLM: max_cpu_loras must be >= max_loras)")
        return self

    @property
    def lora_enabled(self) -> bool:
        """The engine starts with LoRA on (vLLM's --enable-lora) when adapters are configured or
        may be loaded at run time."""
        return bool(self.lora_modules) or self.allow_runtime_lora_updating

    @field_validator("prompt_workers", mode="before")
    @classmethod
    def _workers_from_env(cls, value: object) -> object:
        return int(value) if isinstance(value, str) and value.isdigit() else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_env(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

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
    def engine_client_count(self) -> int:
        """`engine_clients`, with `auto` resolved for this machine."""
        if self.engine_clients != "auto":
            return self.engine_clients
        return 1 if is_cpu_build() else max(1, min(8, len(os.sched_getaffinity(0)) // 2))

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


def _share_internal_token() -> None:
    """Make a token for this run when none is configured. Set in the environment, so that the
    worker processes `bentoml serve` starts from this one (it copies its environment to them)
    all hold the same token."""
    if not os.environ.get("PIPELINE_INTERNAL_TOKEN"):
        os.environ["PIPELINE_INTERNAL_TOKEN"] = secrets.token_urlsafe(32)


_share_internal_token()
settings = Settings()


def stream_tracing(*routes: str) -> dict:
    """A service's BentoML `tracing` config that leaves its streaming routes untraced, unless
    `trace_streams` is set (patterns are regular expressions, searched in the URL)."""
    return {} if settings.trace_streams else {"excluded_urls": list(routes)}


def is_cpu_build() -> bool:
    """True where the installed engine is vllm-cpu (development and CI machines)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return os.environ.get("VLLM_TARGET_DEVICE") == "cpu"
