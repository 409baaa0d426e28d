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

from bench.server_metrics import samples
from harness import poll

DROPS = 50
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}
STREAMS = [
    ("/generate", {"prompt": "Count from one to one thousand.", **LONG}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to a thousand."}], "stream": True, **LONG}),
    ("/v1/completions", {"prompt": "1, 2, 3, 4,", "stream": True, **LONG}),
]
PROBE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 16}


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
    load, waited = pipeline.wait_engine_idle(within_s=1.0)
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


def metrics(pipeline) -> tuple[dict[str, float], dict[str, float]]:
    """Every sample of the front tier's and the GPU tier's /metrics."""
    with httpx.Client(base_url=pipeline.url, timeout=10) as front, pipeline.llm_tier() as llm:
        return samples(front.get("/metrics").text), samples(llm.get("/metrics").text)


def total(found: dict[str, float], name: str, *labels: str) -> float:
    """The sum of the samples of `name` whose labels include each of `labels` (`key="value"`)."""
    return sum(value for key, value in found.items() if key.split("{")[0] == name and all(f in key for f in labels))


def test_metrics_of_both_tiers_count_what_happened(pipeline):
    """Read both tiers' metrics, act, read again: each counter moved by what was done.

    Front: requests by endpoint and status, prompt and completion tokens (as usage counts them),
    templating time, TTFT, time per output token, aborts by reason. GPU tier: vLLM's own engine
    metrics (tokens, queue time, TTFT, inter-token latency; running and waiting requests are
    there) and the pipeline's aborted engine requests."""
    front0, engine0 = metrics(pipeline)
    with httpx.Client(base_url=pipeline.url, timeout=60) as http:
        answer = http.post("/v1/chat/completions", json=PROBE)
        assert answer.status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    usage = answer.json()["usage"]
    assert usage["completion_tokens"] >= 2, usage  # so that there is a time per output token

    def delta(before, after, name, *labels):
        return total(after, name, *labels) - total(before, name, *labels)

    # vLLM records an engine step's figures after handing out its outputs: wait for the last one
    front1, engine1 = poll(lambda: metrics(pipeline),
                           lambda now: delta(engine0, now[1], "vllm:generation_tokens_total") >= usage["completion_tokens"],
                           within_s=10)
    chat = 'endpoint="/v1/chat/completions"'
    assert delta(front0, front1, "bentoml_service_request_total", chat, 'http_response_code="200"') == 1
    assert delta(front0, front1, "bentoml_service_request_total", chat, 'http_response_code="400"') == 1
    assert delta(front0, front1, "pipeline_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta(front0, front1, "pipeline_completion_tokens_total") == usage["completion_tokens"]
    assert delta(front0, front1, "pipeline_prompt_processing_seconds_count") >= 1
    assert delta(front0, front1, "pipeline_time_to_first_token_seconds_count") == 1
    assert delta(front0, front1, "pipeline_time_per_output_token_seconds_count") == 1
    assert delta(engine0, engine1, "vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta(engine0, engine1, "vllm:generation_tokens_total") == usage["completion_tokens"]
    assert delta(engine0, engine1, "vllm:request_queue_time_seconds_count") == 1
    assert delta(engine0, engine1, "vllm:time_to_first_token_seconds_count") == 1
    assert delta(engine0, engine1, "vllm:inter_token_latency_seconds_count") == usage["completion_tokens"] - 1
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert any(key.split("{")[0] == gauge for key in engine1), gauge

    # A client that leaves a stream: one abort on each tier.
    left = 'reason="client_left"'
    drop_one(pipeline.url, *STREAMS[0])
    front2, engine2 = poll(lambda: metrics(pipeline),
                           lambda now: delta(front1, now[0], "pipeline_aborted_requests_total", left) >= 1
                           and delta(engine1, now[1], "pipeline_engine_aborted_requests_total") >= 1,
                           within_s=10)
    assert delta(front1, front2, "pipeline_aborted_requests_total", left) == 1
    assert delta(engine1, engine2, "pipeline_engine_aborted_requests_total") == 1
