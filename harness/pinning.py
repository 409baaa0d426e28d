"""Pinning a server's processes to CPUs: what would run on a GPU host onto its CPU budget.

`pin(gpu_host_processes(server), parse_cpus("0-1"))` holds all of vLLM's server, or the pipeline's
LLMService and engine, to those CPUs; threads started later inherit it.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from harness.process import Server


def gpu_host_processes(server: Server) -> list[psutil.Process]:
    """What runs on the GPU machine: all of vLLM's server, or the pipeline's LLMService workers
    and their engine processes (PromptService could run elsewhere)."""
    if server.name.startswith("vllm"):
        return server.tree()
    return [p for worker in server.workers().get("LLMService", []) for p in [worker, *worker.children(recursive=True)]]


def pin(processes: list[psutil.Process], cpus: set[int]) -> int:
    """Every thread of `processes` onto `cpus` (threads they start later inherit it); returns
    the number of threads pinned."""
    pinned = 0
    for process in processes:
        for thread in Path(f"/proc/{process.pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(thread.name), cpus)
                pinned += 1
            except OSError:
                pass
    return pinned


def parse_cpus(text: str) -> set[int]:
    """`0-1,4` -> {0, 1, 4} (taskset's list form)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus
