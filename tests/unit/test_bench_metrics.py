"""The benchmark's arithmetic (bench/loadgen.py merge, bench/metrics.py, bench/report/serve.py compare)."""

from __future__ import annotations

import pytest

from bench.datasets import Workload
from bench.loadgen import merge
from bench.metrics import percentile, summarize
from bench.report.serve import best_configurations, check_targets, compare


def part(start: float, ttft: float, itl: list[float], output_len: int, error: str = "") -> dict:
    """A `vllm bench serve --save-detailed` result with one request."""
    return {
        "start_times": [start],
        "ttfts": [ttft],
        "latencies": [ttft + sum(itl)],
        "input_lens": [10],
        "output_lens": [output_len],
        "itls": [itl],
        "errors": [error],
        "duration": 1.0,
        "completed": 0 if error else 1,
    }


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 90) == 90


def test_merge_spans_all_processes_and_summarize_follows_vllm_definitions() -> None:
    # two load-generator processes on one clock: the span runs from the first start to the last end
    record = merge(
        [part(100.0, 0.1, [0.01] * 9, 10), part(100.5, 0.2, [0.02] * 4, 5)],
        Workload(input_len=10, output_len=10, concurrency=2, num_prompts=2, clients=2),
    )
    assert record["start_skew_s"] == pytest.approx(0.5)
    assert record["duration_s"] == pytest.approx(0.5 + 0.2 + 0.08)
    f = summarize(record)
    assert f["completed"] == 2 and f["failed"] == 0
    assert f["output_throughput"] == pytest.approx(15 / 0.78)
    assert f["ttft_p50_ms"] == pytest.approx(150)
    # TPOT per request: (latency - ttft) / (tokens - 1) -> 10 ms and 20 ms
    assert f["tpot_p50_ms"] == pytest.approx(15)
    # ITL pools every gap: nine of 10 ms, four of 20 ms
    assert f["itl_p50_ms"] == pytest.approx(10)
    assert f["tokens_per_chunk"] == pytest.approx(1.0)


def test_failed_requests_are_counted_not_timed() -> None:
    record = merge(
        [part(0.0, 0.1, [0.01], 2), part(0.0, 0.0, [], 0, error="boom")],
        Workload(input_len=10, output_len=2, concurrency=2, num_prompts=2, clients=2),
    )
    f = summarize(record)
    assert (f["completed"], f["failed"]) == (1, 1)
    assert f["ttft_p50_ms"] == pytest.approx(100)


def test_compare_gives_ratios_and_targets() -> None:
    def run(target: str, itl: float) -> dict:
        record = merge([part(0.0, 0.05, [itl] * 9, 10)], Workload(10, 10, 1, 1))
        record.pop("_window")
        return record | {"target": target, "cpu": {"loadgen:vllm-bench-serve:1": {"mean": 20.0, "max": 30.0}}}

    rows = compare({"pipeline": {1: run("pipeline", 0.0110)}, "vllm": {1: run("vllm", 0.0100)}})
    assert rows[0]["itl_p50_ratio"] == pytest.approx(1.10)
    assert rows[0]["output_throughput_ratio"] == pytest.approx(0.14 / 0.149)
    assert rows[0]["ttft_p50_delta_ms"] == pytest.approx(0)
    checks = {c["target"]: c["met"] for c in check_targets(rows, gpu=True, small_model=False)}
    assert checks["ITL p50 at most 3% above vLLM at c=1 (ratio)"] is False
    assert checks["TTFT p50 at most 5 ms above vLLM at c=1 (ms above)"] is True
    # a pipeline faster than vLLM's server meets the ITL target
    faster = compare({"pipeline": {1: run("pipeline", 0.0090)}, "vllm": {1: run("vllm", 0.0100)}})
    assert {c["target"]: c["met"] for c in check_targets(faster, gpu=True, small_model=False)}[
        "ITL p50 at most 3% above vLLM at c=1 (ratio)"
    ] is True
    assert checks["output throughput >= 98% of vLLM at c=1"] is False


def test_best_configurations_compare_the_best_of_each_server() -> None:
    def run(target: str, itl: float) -> dict:
        record = merge([part(0.0, 0.05, [itl] * 9, 10)], Workload(10, 10, 1, 1))
        record.pop("_window")
        return record | {"target": target, "cpu": {}}

    runs = {"pipeline-ec2": {1: run("pipeline-ec2", 0.012)}, "pipeline-ec8": {1: run("pipeline-ec8", 0.010)},
            "vllm-api8": {1: run("vllm-api8", 0.011)}, "vllm": {1: run("vllm", 0.020)}}
    [row] = best_configurations(runs)
    assert row["best"] == {"pipeline": "pipeline-ec8", "vllm": "vllm-api8"}
    # the best pipeline (ec8) against the best vLLM (api8), not against vLLM's default
    assert row["throughput_ratio_to_best_vllm"] == pytest.approx((0.05 + 9 * 0.011) / (0.05 + 9 * 0.010))
    assert row["throughput_ratio_to_vllm_default"] == pytest.approx((0.05 + 9 * 0.020) / (0.05 + 9 * 0.010))
    # the two-server table has only `vllm` here (no plain `pipeline`): no ratio in it
    assert "output_throughput_ratio" not in compare(runs)[0]
