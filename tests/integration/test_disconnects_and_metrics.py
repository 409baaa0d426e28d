"""Clients that leave, health and metrics, on the session's `pipeline`.

50 streams dropped half-way (a mix of /generate and both OpenAI streaming routes): every engine
request is aborted within a second, and the next requests are as fast as before. Then each tier's
/livez, /readyz and /metrics.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

DROPS = 50
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}
STREAMS = [
    ("/generate", {"prompt": "Count from one to one thousand.", **LONG}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to a thousand."}], "stream": True, **LONG}),
    ("/v1/completions", {"prompt": "1, 2, 3, 4,", "stream": True, **LONG}),
]
PROBE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 16}


def engine_load(pipeline) -> int:
    with pipeline.llm_tier() as llm:
        return llm.post("/load", json={}).json()["unfinished_requests"]


def wait_engine_idle(pipeline, within_s: float) -> tuple[int, float]:
    """The engine's unfinished requests once it reaches 0 or `within_s` passes, and the time taken."""
    started = time.monotonic()
    with pipeline.llm_tier() as llm:
        while True:
            load = llm.post("/load", json={}).json()["unfinished_requests"]
            waited = time.monotonic() - started
            if load == 0 or waited > within_s:
                return load, waited
            time.sleep(0.02)


def probe_latencies(url: str, count: int = 5) -> list[float]:
    """Seconds for `count` short chat requests, one after another."""
    times = []
    with httpx.Client(base_url=url, timeout=httpx.Timeout(60, connect=5)) as http:
        for _ in range(count):
            started = time.monotonic()
            response = http.post("/v1/chat/completions", json=PROBE)
            assert response.status_code == 200
            times.append(time.monotonic() - started)
    return times


def drop_one(url: str, path: str, body: dict) -> None:
    """Start a stream, read its first chunk, and leave."""
    with httpx.Client(base_url=url, timeout=httpx.Timeout(60, connect=5)) as http:
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200, response.read()[:300]
            next(response.iter_raw())


def test_fifty_dropped_streams_leave_the_engine_idle_and_fast(pipeline, record_property):
    before = probe_latencies(pipeline.url)
    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda i: drop_one(pipeline.url, *STREAMS[i % len(STREAMS)]), range(DROPS)))
    load, waited = wait_engine_idle(pipeline, within_s=1.0)
    assert load == 0, f"{load} engine requests still unfinished {waited:.2f} s after the last drop"
    # Loose, and re-measured on a miss: the machine may be shared, so a burst of someone else's
    # load must not fail the test; work left running in the engine would (it shows in `load` too).
    bound = 2 * statistics.median(before) + 1.0
    after = probe_latencies(pipeline.url)
    for _ in range(2):
        if statistics.median(after) < bound:
            break
        time.sleep(2)
        after = min(after, probe_latencies(pipeline.url), key=statistics.median)
    record_property("drops", DROPS)
    record_property("idle_after_s", round(waited, 3))
    record_property("probe_median_before_s", round(statistics.median(before), 3))
    record_property("probe_median_after_s", round(statistics.median(after), 3))
    print(f"\n{DROPS} drops; engine idle after {waited:.3f} s; probe median before "
          f"{statistics.median(before):.3f} s, after {statistics.median(after):.3f} s")
    assert statistics.median(after) < bound


def test_both_tiers_are_live_and_ready(pipeline):
    with httpx.Client(base_url=pipeline.url, timeout=10) as front, pipeline.llm_tier() as llm:
        for tier in (front, llm):
            assert tier.get("/livez").status_code == 200
            assert tier.get("/readyz").status_code == 200


def metric_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_of_both_tiers(pipeline):
    """Front: requests by endpoint and status, tokens, templating time, TTFT, time per output token,
    aborts. GPU tier: vLLM's own engine metrics (queue time, running and waiting requests) too."""
    with httpx.Client(base_url=pipeline.url, timeout=60) as http:
        assert http.post("/v1/chat/completions", json=PROBE).status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        front = http.get("/metrics").text
    names = metric_names(front)
    for name in ("pipeline_prompt_tokens_total", "pipeline_completion_tokens_total",
                 "pipeline_prompt_processing_seconds_count", "pipeline_time_to_first_token_seconds_count",
                 "pipeline_time_per_output_token_seconds_count", "bentoml_service_request_total",
                 "bentoml_service_request_in_progress"):
        assert name in names, name
    assert 'endpoint="/v1/chat/completions"' in front and 'http_response_code="400"' in front
    assert 'pipeline_aborted_requests_total{reason="client_left"}' in front
    with pipeline.llm_tier() as llm:
        engine = llm.get("/metrics").text
    engine_names = metric_names(engine)
    for name in ("vllm:request_queue_time_seconds_count", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "pipeline_engine_aborted_requests_total"):
        assert name in engine_names, name
