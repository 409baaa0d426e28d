"""Tensor parallelism is one setting: PIPELINE_TENSOR_PARALLEL_SIZE=N gives vLLM
tensor_parallel_size=N, makes LLMService ask for N GPUs, and BentoML's allocator then hands the
engine's worker N devices (CUDA_VISIBLE_DEVICES), in `bentoml serve` and in the per-tier start alike
(both go through `serve_http`). The front tier gets no GPU. Checked in a fresh process, because the
settings are read once at import. The run on two real GPUs is scripts/gpu_tp_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json
from _bentoml_impl.server.allocator import ResourceAllocator
from services.config import settings
from services.gpu.engine_args import engine_args
from services.gpu.llm_service import LLMService
from services.front.prompt_service import PromptService

PromptService.inject_config()  # what BentoML's start does before serving
allocator = ResourceAllocator()
llm_workers, llm_env = allocator.get_worker_env(LLMService)
_, prompt_env = allocator.get_worker_env(PromptService)
print(json.dumps({
    "llm_resources": LLMService.config["resources"],
    "engine_tensor_parallel_size": engine_args(settings).tensor_parallel_size,
    "llm_workers": llm_workers,
    "llm_cuda_visible_devices": llm_env.get("CUDA_VISIBLE_DEVICES"),
    "prompt_cuda_visible_devices": prompt_env.get("CUDA_VISIBLE_DEVICES"),
}))
"""


def probe(tensor_parallel_size: int) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in {"CUDA_VISIBLE_DEVICES", "BENTOML_DISABLE_GPU_ALLOCATION"}}
    env.update(PIPELINE_TENSOR_PARALLEL_SIZE=str(tensor_parallel_size), PYTHONPATH=str(ROOT),
               BENTOML_DO_NOT_TRACK="true")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_tensor_parallel_size_sets_the_engine_and_the_gpu_count_together():
    found = probe(2)
    assert found["engine_tensor_parallel_size"] == 2
    assert found["llm_resources"] == {"gpu": 2}
    assert found["llm_workers"] == 1, "one engine process drives all its GPUs"
    assert found["llm_cuda_visible_devices"] == "0,1"
    assert found["prompt_cuda_visible_devices"] is None
