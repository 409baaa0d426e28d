"""PromptService's /readyz is its own readiness (the GPU tier as the front routes to it), never
BentoML's probe of the `--depends` URL. With several replicas that URL routes nothing, and while
it refused connections, BentoML's probe held /readyz until the traffic timeout (5.5 minutes), and
a front asked /readyz then could not stop before SIGKILL (scripts/container_check.py found it).

A real PromptService process against the stand-in GPU tier (no engine): seconds.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
import types
from pathlib import Path

import httpx

from harness import start_tier

FAKE = Path(__file__).resolve().parents[1] / "unit" / "fake_gpu_tier.py"


def _fake_gpu_tier() -> types.ModuleType:
    if "fake_gpu_tier" in sys.modules:  # the unit tests' import of it, in a run of the whole suite
        return sys.modules["fake_gpu_tier"]
    spec = importlib.util.spec_from_file_location("fake_gpu_tier", FAKE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_gpu_tier"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_readyz_ignores_a_refused_depends_url_and_the_front_stops_promptly(tmp_path: Path):
    fake = _fake_gpu_tier()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once closed
    with fake.served_gpu_tier(fake.FakeGpuTier()) as replica:
        front = start_tier("PromptService", log=tmp_path / "front.log", depends={"LLMService": refused},
                           env={"PIPELINE_GPU_TIER_REPLICAS": replica.url, "PIPELINE_INTERNAL_TOKEN": fake.TOKEN},
                           wait=False)
        try:
            front.wait_ready(timeout_s=90)
            assert [httpx.get(f"{front.url}/readyz", timeout=5).status_code for _ in range(3)] == [200] * 3
        finally:
            stopping = time.monotonic()
            front.stop(timeout_s=20)  # SIGTERM, then SIGKILL after 20 s
            stop_s = time.monotonic() - stopping
        assert stop_s < 15, f"the front took {stop_s:.1f} s to stop on SIGTERM"
