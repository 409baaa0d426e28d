"""Where the engine keeps what it compiles: one folder a deployment can keep (PIPELINE_CACHE_DIR).

A GPU replica's start is mostly compiling: vLLM's torch.compile of the model (Dynamo, Inductor),
Triton kernels (vLLM's own, and Inductor's), FlashInfer's JIT kernels and autotune results, and
the CUDA driver's PTX JIT. Each library keeps its cache in a place of its own (~/.cache/vllm,
/tmp/torchinductor_$USER, ~/.triton/cache, ~/.cache/flashinfer, ~/.nv/ComputeCache), so a new
container starts from nothing. `cache_environment(folder)` points them all under one folder; on a
volume that outlives a replica (docs/deployment.md), the next replica reuses the compiled
artifacts and skips the compile. Each library keys its entries by model, settings and versions, so
replicas of different models or vLLM versions can share the volume.
"""

from __future__ import annotations

from pathlib import Path

# variable -> sub-folder of PIPELINE_CACHE_DIR
CACHE_VARIABLES = {
    "VLLM_CACHE_ROOT": "vllm",  # torch.compile artifacts, FlashInfer autotune results
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",  # Inductor's FX-graph and kernel caches outside vLLM's own
    "TRITON_CACHE_DIR": "triton",  # Triton kernels compiled outside vLLM's compile cache
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",  # FlashInfer's JIT-built kernels
    "CUDA_CACHE_PATH": "nv",  # the CUDA driver's PTX JIT cache
}


def cache_environment(folder: str | Path) -> dict[str, str]:
    """The cache variables, each pointing at its sub-folder of `folder`."""
    root = Path(folder).expanduser().resolve()
    return {name: str(root / sub) for name, sub in CACHE_VARIABLES.items()}
