"""Where a request's first-token time goes, from the servers' own Prometheus metrics.

The load generator sees one time to first token. The servers' histograms split it: vLLM's engine
metrics (`vllm:*`, on vLLM's server and on LLMService) say how long the engine took from the
request's arrival to its first token, and how much of that it waited in the queue; the front
tier's `pipeline_*` metrics say how long templating and tokenization took and how long the GPU
tier took as PromptService saw it. Scraped before and after each load level, the difference of
each histogram's sum and count gives that level's mean.
"""

from __future__ import annotations

import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness import Server

# histogram -> the name it gets in the record
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": "engine_ttft",
    "vllm:request_queue_time_seconds": "engine_queue",
    "vllm:request_prefill_time_seconds": "engine_prefill",
    "vllm:inter_token_latency_seconds": "engine_itl",
    "pipeline_prompt_processing_seconds": "front_prompt_processing",
    "pipeline_time_to_first_token_seconds": "front_ttft_from_gpu_tier",
    "pipeline_time_per_output_token_seconds": "front_tpot",
}


def metrics_urls(server: Server) -> dict[str, str]:
    """Where a server's Prometheus metrics are: vLLM's server has one `/metrics`; the pipeline has
    the front tier's and LLMService's (the engine's), on LLMService's Unix socket."""
    urls = {server.name: server.url + "/metrics"}
    if server.name == "pipeline":
        try:
            urls["LLMService"] = "unix:" + server.llm_socket()
        except (RuntimeError, OSError) as error:  # the engine's figures go missing, the run goes on
            print(f"LLMService's metrics not found: {error}", file=sys.stderr)
    return urls


def scrape(urls: dict[str, str]) -> dict[str, tuple[float, float]]:
    """(sum, count) of every histogram above, over all label sets, from each `/metrics` URL
    (`urls`: a label -> URL; a Unix socket as `unix:PATH`). A server that does not answer adds nothing."""
    totals: dict[str, tuple[float, float]] = {}
    for url in urls.values():
        try:
            text = _get(url)
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            if family.name not in HISTOGRAMS:
                continue
            total, count = totals.get(family.name, (0.0, 0.0))
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
            totals[family.name] = (total, count)
    return totals


def samples(text: str) -> dict[str, float]:
    """Every sample of a `/metrics` page by its name and labels, as the page writes them:
    `name{label="value",...}` (labels sorted), or `name` alone."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def level_means_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean of each histogram over the requests between two scrapes, in ms."""
    means = {}
    for name, (total, count) in after.items():
        total0, count0 = before.get(name, (0.0, 0.0))
        if count > count0:
            means[f"{HISTOGRAMS[name]}_mean_ms"] = round(1000 * (total - total0) / (count - count0), 2)
    return means


def _get(url: str) -> str:
    if url.startswith("unix:"):
        transport = httpx.HTTPTransport(uds=url.removeprefix("unix:"))
        with httpx.Client(transport=transport, base_url="http://tier", timeout=10) as client:
            return client.get("/metrics").raise_for_status().text
    return httpx.get(url, timeout=10).raise_for_status().text


ENGINE_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total")


def engine_counters(url: str) -> dict[str, float]:
    """A server's vLLM counters (prompt tokens looked up in the prefix cache, found there, and
    requests finished), each summed over its labels, from the `/metrics` at `url` (a vLLM server's,
    or an LLMService replica's, which is open)."""
    found = samples(_get(url))
    return {name: sum(value for key, value in found.items() if key == name or key.startswith(name + "{"))
            for name in ENGINE_COUNTERS}


ROUTER_COUNTERS = ("pipeline_replica_requests_total", "pipeline_replica_prompt_blocks_total",
                   "pipeline_replica_cached_blocks_predicted_total")


def router_counters(urls: list[str]) -> dict[str, dict[str, float]]:
    """What the pipeline's fronts believed, per replica (`host:port`): requests routed there, the
    prompts' full blocks, and the blocks the router expected cached; summed over the fronts'
    `/metrics` at `urls` (each front's is already summed over its workers)."""
    believed: dict[str, dict[str, float]] = {}
    for url in urls:
        for family in text_string_to_metric_families(_get(url)):
            for sample in family.samples:
                if sample.name in ROUTER_COUNTERS and "replica" in sample.labels:
                    counters = believed.setdefault(sample.labels["replica"], dict.fromkeys(ROUTER_COUNTERS, 0.0))
                    counters[sample.name] += sample.value
    return believed


def routing_reasons(urls: list[str]) -> dict[str, float]:
    """Why the fronts' `kv` routing chose the replicas it did (`pipeline_routing_decisions_total`
    by reason: held, new, load, guarded), summed over the fronts' `/metrics` at `urls`."""
    reasons: dict[str, float] = {}
    for url in urls:
        for family in text_string_to_metric_families(_get(url)):
            for sample in family.samples:
                if sample.name == "pipeline_routing_decisions_total":
                    reasons[sample.labels["reason"]] = reasons.get(sample.labels["reason"], 0.0) + sample.value
    return reasons


def engine_block_size(url: str) -> int | None:
    """The KV-cache block size of the engine behind `url` (a `/metrics`), from vLLM's
    `vllm:cache_config_info` gauge, which carries the cache's settings as labels."""
    for family in text_string_to_metric_families(_get(url)):
        if family.name == "vllm:cache_config_info":
            for sample in family.samples:
                if sample.labels.get("block_size", "").isdigit():
                    return int(sample.labels["block_size"])
    return None
