"""Where the engine keeps what it compiles: one folder a deployment can keep (PIPELINE_CACHE_DIR).

`cache_environment(folder)` points every compile cache (vLLM's torch.compile, Inductor, Triton,
FlashInfer, the CUDA driver's PTX JIT) under one folder; on a volume that outlives a replica, the
next replica skips the compile. Entries are keyed by model, settings and versions, so replicas of
different models or vLLM versions can share it (docs/architecture.md, "A replica's start").
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
