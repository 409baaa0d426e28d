"""The GPU tier's own Prometheus metrics, served by LLMService's BentoML `/metrics` beside vLLM's
engine metrics (`vllm:*`: queue time, TTFT, inter-token latency, running and waiting requests,
KV-cache use), which the engine registers in the same process. Prefixed `pipeline_engine_`.

As on the front tier (services/front/metrics.py), BentoML sets prometheus_client's multiprocess
directory only when a worker starts, so the metrics are made on first use, never at import time.
"""

from __future__ import annotations

from functools import cache


class EngineMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter

        self.refused = Counter(
            "pipeline_engine_refused_requests", "Requests refused because the engine held its cap (429).",
        )
        self.aborted = Counter(
            "pipeline_engine_aborted_requests",
            "Engine requests aborted before they finished (the caller left or asked to abort).",
        )


@cache
def engine_metrics() -> EngineMetrics:
    return EngineMetrics()
