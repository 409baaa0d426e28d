"""The front's metrics (services/front/metrics.py): labelled series exist at 0 from the start, and the
GPU tier's readiness as the front sees it is a gauge moved by the background check and by a
failed call, not by requests (services/front/health.py)."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from services.front.health import TierMonitor
from services.front.metrics import ABORT_REASONS, PROMPT_KINDS, front_metrics


def gauge() -> float | None:
    return REGISTRY.get_sample_value("pipeline_gpu_tier_ready")


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_labelled_series_start_at_zero():
    """A counter series born at 1 shows no increase() in Prometheus: every reason and kind is
    exported at 0 before the first event."""
    front_metrics()
    for reason in ABORT_REASONS:
        assert REGISTRY.get_sample_value("pipeline_aborted_requests_total", {"reason": reason}) is not None
    for kind in PROMPT_KINDS:
        assert REGISTRY.get_sample_value("pipeline_prompt_processing_seconds_count", {"kind": kind}) is not None


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
