"""The front tier's own Prometheus metrics (`pipeline_*`), on PromptService's `/metrics`.

They add what only the front knows to BentoML's request counts: tokens, templating time, TTFT and
inter-token latency as the client sees them, aborts by reason, the GPU tier's readiness, and
series per adapter and per replica. Created on first use (`front_metrics()`), never at import:
BentoML sets the multiprocess folder only when a worker starts, after this module is imported.
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ABORT_REASONS = ("client_left", "deadline", "gpu_tier")  # pipeline_aborted_requests_total{reason}
PROMPT_KINDS = ("chat", "text")  # pipeline_prompt_processing_seconds{kind}
# pipeline_routing_decisions_total{reason}, why `kv` routing chose a replica (routing/policy.py): it holds the
# most of the prompt; the prompt is held nowhere; a replica holding more was open but cost more (its load);
# every replica holding more was passed over by a guard (a full cache, a queue, a load far above the least loaded)
ROUTING_REASONS = ("held", "new", "load", "guarded")


class FrontMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.prompt_tokens = Counter("pipeline_prompt_tokens", "Prompt tokens sent to the GPU tier.")
        self.completion_tokens = Counter("pipeline_completion_tokens", "Completion tokens received from the GPU tier.")
        self.prompt_processing = Histogram(
            "pipeline_prompt_processing_seconds", "Time in chat templating and tokenization, per prompt.",
            ["kind"], buckets=FAST_BUCKETS,
        )
        self.time_to_first_token = Histogram(
            "pipeline_time_to_first_token_seconds",
            "From handing the tokenized prompt to the GPU tier to its first token (queue time included).",
            buckets=LATENCY_BUCKETS,
        )
        # One observation per request, not per token: in BentoML's multiprocess metrics each one
        # costs a few microseconds, 10% of the front's CPU per token when it was per token.
        self.time_per_output_token = Histogram(
            "pipeline_time_per_output_token_seconds",
            "Per request, (last token - first token) / (tokens - 1), as the front tier gets them.",
            buckets=FAST_BUCKETS,
        )
        self.aborted = Counter(
            "pipeline_aborted_requests", "Generations stopped before they finished, by reason.", ["reason"]
        )
        # Every label value from the start, at 0: a series born at 1 shows no increase in PromQL.
        for reason in ABORT_REASONS:
            self.aborted.labels(reason)
        for kind in PROMPT_KINDS:
            self.prompt_processing.labels(kind)
        # One series for the whole front: the lowest over its live workers, so 0 when any of them
        # refuses work because it found the GPU tier not ready.
        self.gpu_tier_ready = Gauge(
            "pipeline_gpu_tier_ready",
            "1 while the front's last check of the GPU tier (its /readyz) succeeded, else 0.",
            multiprocess_mode="livemin",
        )
        # LoRA adapters (services/gpu/lora.py): one series per adapter name, the base model not counted
        # here (the totals above count every request)
        self.lora_requests = Counter("pipeline_lora_requests", "Generation requests per LoRA adapter.", ["adapter"])
        self.lora_prompt_tokens = Counter("pipeline_lora_prompt_tokens", "Prompt tokens per LoRA adapter.", ["adapter"])
        self.lora_completion_tokens = Counter(
            "pipeline_lora_completion_tokens", "Completion tokens per LoRA adapter.", ["adapter"]
        )

        # Per GPU-tier replica (services/front/routing/), only with PIPELINE_GPU_TIER_REPLICAS set
        self.replica_requests = Counter("pipeline_replica_requests", "Generation requests routed to each GPU-tier replica.",
                                        ["replica"])
        self.replica_prompt_blocks = Counter(
            "pipeline_replica_prompt_blocks", "Full KV-cache blocks of the prompts routed to each replica (at its block size).",
            ["replica"])
        self.replica_cached_blocks_predicted = Counter(
            "pipeline_replica_cached_blocks_predicted",
            "Of those blocks, the ones the router believed cached on the replica it chose (kv routing only).", ["replica"])
        self.replica_inflight = Gauge("pipeline_replica_inflight", "Requests streaming from each replica now.",
                                      ["replica"], multiprocess_mode="livesum")
        self.replica_ready = Gauge(
            "pipeline_replica_ready", "1 while the front's last check of the replica's /readyz succeeded, else 0 "
            "(the lowest over the front's live workers).", ["replica"], multiprocess_mode="livemin")
        self.replica_retries = Counter(
            "pipeline_replica_retries", "Requests moved away from a replica that failed or refused them before their "
            "first token.", ["replica"])
        self.routing_decisions = Counter(
            "pipeline_routing_decisions", "kv routing's choices, by reason: the replica chosen holds the most of the prompt "
            "(held), the prompt is held nowhere (new), a replica holding more was passed over for its load (load) or by a "
            "guard: full cache, queue, or far busier than the least loaded (guarded).", ["reason"])
        self.routing_reason = {reason: self.routing_decisions.labels(reason) for reason in ROUTING_REASONS}
        self.replica_events_live = Gauge(
            "pipeline_replica_events_live", "1 while the replica's /kv_events stream is live (its snapshot arrived and "
            "no silence past the read deadline since), so its index is trusted; else 0 (the lowest over the front's "
            "live workers).", ["replica"], multiprocess_mode="livemin")

    def for_replica(self, replica: str) -> ReplicaMetrics:
        """One replica's series (made once per replica, so routing does no label lookups)."""
        return ReplicaMetrics(*(metric.labels(replica) for metric in (
            self.replica_requests, self.replica_prompt_blocks, self.replica_cached_blocks_predicted,
            self.replica_inflight, self.replica_ready, self.replica_retries, self.replica_events_live)))

    def count_adapter_request(self, adapter: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.lora_requests.labels(adapter).inc()
        self.lora_prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.lora_completion_tokens.labels(adapter).inc(completion_tokens)


class ReplicaMetrics(NamedTuple):
    requests: Any
    prompt_blocks: Any
    cached_blocks_predicted: Any
    inflight: Any
    ready: Any
    retries: Any
    events_live: Any


@cache
def front_metrics() -> FrontMetrics:
    return FrontMetrics()
