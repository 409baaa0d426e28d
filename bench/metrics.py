"""Figures of one load level from its per-request record (loadgen.py), by vLLM's definitions.

TTFT: request start to its first streamed chunk. ITL: time between consecutive chunks (all
requests' gaps pooled). TPOT: per request, (latency - TTFT) / (output tokens - 1). E2E: request
start to its last chunk. Throughputs divide by the span from the first request's start to the last
request's end, over all load-generator processes. Only successful requests enter the latencies.
"""

from __future__ import annotations

import statistics

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _spread(name: str, values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    out = {f"{name}_mean_ms": statistics.fmean(ms) if ms else float("nan")}
    out |= {f"{name}_p{q}_ms": percentile(ms, q) for q in PERCENTILES}
    return out


def summarize(record: dict) -> dict[str, float]:
    r = record["requests"]
    ok = [i for i, error in enumerate(r["error"]) if not error]
    duration = record["duration_s"]
    output_tokens = sum(r["output_len"][i] for i in ok)
    tpots = [
        (r["latency_s"][i] - r["ttft_s"][i]) / (r["output_len"][i] - 1) for i in ok if r["output_len"][i] > 1
    ]
    chunks = sum(len(r["itl_s"][i]) + 1 for i in ok)
    figures = {
        "completed": len(ok),
        "failed": len(r["error"]) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(r["prompt_len"][i] for i in ok)) / duration,
        "tokens_per_chunk": output_tokens / chunks if chunks else float("nan"),
    }
    figures |= _spread("ttft", [r["ttft_s"][i] for i in ok])
    figures |= _spread("tpot", tpots)
    figures |= _spread("itl", [gap for i in ok for gap in r["itl_s"][i]])
    figures |= _spread("e2el", [r["latency_s"][i] for i in ok])
    return figures


def errors(record: dict, limit: int = 3) -> list[str]:
    """The first few distinct error messages (shortened)."""
    seen: list[str] = []
    for error in record["requests"]["error"]:
        short = (error or "").strip().splitlines()[-1][:300] if error else ""
        if short and short not in seen:
            seen.append(short)
        if len(seen) >= limit:
            break
    return seen
