"""Repeated, alternating runs (`python -m bench serve --rounds R`): medians and spread per server
and level, and the pipeline-over-vLLM ratio of the medians and of each round (the two servers
measured back to back in each round).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from bench.metrics import summarize

FIGURES = ("output_throughput", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "itl_p50_ms")
RUN_FILE = re.compile(r"(?P<target>.+)-c(?P<c>\d+)-r(?P<round>\d+)\.json")


def load(results: Path) -> dict[tuple[str, int], dict[int, dict]]:
    """(target, concurrency) -> round -> the level's summary figures."""
    runs: dict[tuple[str, int], dict[int, dict]] = {}
    for path in sorted((results / "runs").glob("*-r*.json")):
        if match := RUN_FILE.fullmatch(path.name):
            figures = summarize(json.loads(path.read_text()))
            runs.setdefault((match["target"], int(match["c"])), {})[int(match["round"])] = figures
    return runs


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def table(runs: dict[tuple[str, int], dict[int, dict]]) -> list[dict]:
    rows = []
    for (target, c), rounds in sorted(runs.items(), key=lambda item: (item[0][1], item[0][0])):
        ordered = [rounds[k] for k in sorted(rounds)]
        row = {"target": target, "concurrency": c, "failed": sum(f["failed"] for f in ordered)}
        for name in FIGURES:
            row[name] = spread([f[name] for f in ordered])
        rows.append(row)
    return rows


def ratios(runs: dict[tuple[str, int], dict[int, dict]]) -> list[dict]:
    """Every pipeline target over every vLLM target at each level: output throughput, the ratio of
    the medians and the ratios round by round (the two measured back to back in each round)."""
    out = []
    for (pipe, c), pipe_rounds in sorted(runs.items()):
        if not pipe.startswith("pipeline"):
            continue
        for (ref, c2), ref_rounds in sorted(runs.items()):
            if c2 != c or not ref.startswith("vllm"):
                continue
            common = sorted(set(pipe_rounds) & set(ref_rounds))
            per_round = [pipe_rounds[k]["output_throughput"] / ref_rounds[k]["output_throughput"] for k in common]
            median_ratio = (statistics.median(r["output_throughput"] for r in pipe_rounds.values())
                            / statistics.median(r["output_throughput"] for r in ref_rounds.values()))
            ttft = [pipe_rounds[k]["ttft_p50_ms"] - ref_rounds[k]["ttft_p50_ms"] for k in common]
            out.append({"pipeline": pipe, "vllm": ref, "concurrency": c, "ratio_of_medians": median_ratio,
                        "ratio_by_round": spread(per_round) if per_round else None,
                        "ttft_p50_difference_ms_by_round": spread(ttft) if ttft else None})
    return out


def markdown(rows: list[dict], compared: list[dict]) -> str:
    lines = ["| c | server | runs | output tok/s, median (min-max) | TTFT p50 ms, median (min-max) | TPOT p50 ms, median (min-max) | failed |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        t, f, p = row["output_throughput"], row["ttft_p50_ms"], row["tpot_p50_ms"]
        lines.append(f"| {row['concurrency']} | {row['target']} | {t['n']} | {t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f}) | "
                     f"{f['median']:.1f} ({f['min']:.1f}-{f['max']:.1f}) | {p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f}) | {row['failed']} |")
    lines += ["", "| c | pipeline / vLLM | ratio of medians | ratio by round, median (min-max) | TTFT p50 difference ms by round, median (min-max) |",
              "|---|---|---|---|---|"]
    for r in compared:
        b, d = r["ratio_by_round"], r["ttft_p50_difference_ms_by_round"]
        lines.append(f"| {r['concurrency']} | {r['pipeline']} / {r['vllm']} | {r['ratio_of_medians']:.3f} | "
                     f"{b['median']:.3f} ({b['min']:.3f}-{b['max']:.3f}) | {d['median']:+.1f} ({d['min']:+.1f} to {d['max']:+.1f}) |")
    return "\n".join(lines) + "\n"
