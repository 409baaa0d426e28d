"""The front's view of the GPU tier's readiness is a Prometheus gauge, moved by the background
check and by a failed call, not by requests (services/health.py, services/metrics.py)."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from services.health import TierMonitor
from services.metrics import front_metrics


def gauge() -> float | None:
    return REGISTRY.get_sample_value("pipeline_gpu_tier_ready")


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_the_gauge_follows_the_tier_readiness():
    front_metrics()
    answers = [True]

    async def check() -> bool:
        return answers[0]

    async def scenario() -> None:
        monitor = TierMonitor("LLMService", interval_s=0.01)
        front_metrics().gpu_tier_ready.set(0)
        assert gauge() == 0.0  # not checked yet: not ready
        monitor.watch(check)
        await until(lambda: monitor.ready)
        assert gauge() == 1.0
        answers[0] = False
        await until(lambda: not monitor.ready)
        assert gauge() == 0.0
        answers[0] = True
        await until(lambda: monitor.ready)
        assert gauge() == 1.0
        monitor.mark_down("a call failed")  # a failed request marks it down at once
        assert gauge() == 0.0
        await monitor.stop()

    asyncio.run(scenario())
