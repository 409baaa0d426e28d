"""The `routing` report: per workload and system the medians over rounds with their spread, each
replica's measured hit rate and requests, and issue 28's targets for each pipeline system, each a
ratio of two systems measured in the same round (then the median of the rounds' ratios, with its
spread).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from bench.metrics import summarize
from services.front.metrics import ROUTING_REASONS

RUN_FILE = re.compile(r"(?P<run>(?:prefix|mixed|multiturn|random)-c\d+)-(?P<system>.+)-r(?P<round>\d+)\.json")
OURS = ("pipeline-kv", "pipeline-kv-2fronts")  # each judged against the targets on its own
HIT_RATE_POINTS = 3  # the hit rate's largest gap under the ideal, in points

# (name, figure, other system, bound, higher is better): issue 28's targets, by workload
CACHE_AWARE = "router-cache_aware"
TARGETS = {
    "mixed": [
        ("throughput >= 1.10x vllm-router cache_aware", "output_throughput", CACHE_AWARE, 1.10, True),
        ("TTFT p90 <= vllm-router cache_aware's", "ttft_p90_ms", CACHE_AWARE, 1.0, False),
    ],
    "chat": [
        ("throughput >= 1.0x vllm-router cache_aware", "output_throughput", CACHE_AWARE, 1.0, True),
        ("TTFT p90 <= vllm-router cache_aware's", "ttft_p90_ms", CACHE_AWARE, 1.0, False),
    ],
    "random": [
        ("throughput >= 0.98x round-robin (vllm-router)", "output_throughput", "router-round_robin", 0.98, True),
        ("TTFT p50 within 10% of round-robin's (vllm-router)", "ttft_p50_ms", "router-round_robin", 1.10, False),
    ],
}
COMPARED = ("router-kv_aware",)  # shown beside the targets: the peer's best configuration, when run


def figures(record: dict) -> dict:
    """One run's figures: the load generator's, and the engines' own hit rate and spread."""
    found = summarize(record)
    replicas = record["replicas"]
    queried = sum(r["vllm:prefix_cache_queries_total"] for r in replicas.values())
    hits = sum(r["vllm:prefix_cache_hits_total"] for r in replicas.values())
    found["hit_rate"] = hits / queried if queried else float("nan")
    found["ideal_hit_rate"] = record.get("ideal_hit_rate", float("nan"))
    found["requests_per_replica"] = [round(r["vllm:request_success_total"]) for r in replicas.values()]
    found["hit_rate_per_replica"] = [
        r["vllm:prefix_cache_hits_total"] / r["vllm:prefix_cache_queries_total"] if r["vllm:prefix_cache_queries_total"]
        else float("nan") for r in replicas.values()]
    found["routing_reasons"] = record.get("routing_reasons")  # the pipeline's kv decisions by reason, when recorded
    return found


def load(results: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """run label -> system -> round -> figures."""
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted((results / "runs").glob("*.json")):
        if match := RUN_FILE.fullmatch(path.name):
            runs.setdefault(match["run"], {}).setdefault(match["system"], {})[int(match["round"])] = figures(
                json.loads(path.read_text()))
    return runs


def spread(values: list[float]) -> dict:
    values = [v for v in values if v == v]  # NaN: not measured
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(rounds: dict[int, dict], other: dict[int, dict], figure: str) -> dict:
    """`figure` of one system over another's, round by round (measured back to back)."""
    common = sorted(set(rounds) & set(other))
    return spread([rounds[k][figure] / other[k][figure] for k in common if other[k][figure]])


def analyse(runs: dict[str, dict[str, dict[int, dict]]]) -> dict:
    report: dict = {}
    for label, systems in sorted(runs.items()):
        rows = {}
        for system, rounds in systems.items():
            ordered = [rounds[k] for k in sorted(rounds)]
            rows[system] = {name: spread([f[name] for f in ordered])
                            for name in ("output_throughput", "ttft_p50_ms", "ttft_p90_ms", "hit_rate", "ideal_hit_rate")}
            rows[system]["failed"] = sum(f["failed"] for f in ordered)
            rows[system]["requests_per_replica"] = [f["requests_per_replica"] for f in ordered]
            rows[system]["hit_rate_per_replica"] = [f["hit_rate_per_replica"] for f in ordered]
            if any(f.get("routing_reasons") for f in ordered):
                rows[system]["routing_reasons"] = [f.get("routing_reasons") or {} for f in ordered]
        targets = []
        workload = label.split("-")[0]
        kind = workload if workload in TARGETS else "chat"
        for name in OURS:
            if (ours := systems.get(name)) is None:
                continue
            for target, figure, other, bound, higher in TARGETS[kind]:
                if other not in systems:
                    continue
                measured = ratio(ours, systems[other], figure)
                met = measured["median"] >= bound if higher else measured["median"] <= bound
                targets.append({"system": name, "target": target, "ratio": measured, "met": met})
            if kind != "random":
                gap = spread([ours[k]["ideal_hit_rate"] - ours[k]["hit_rate"] for k in sorted(ours)])
                targets.append({"system": name, "target": f"hit rate within {HIT_RATE_POINTS} points of the ideal",
                                "gap_points": {k: 100 * v for k, v in gap.items() if k != "n"},
                                "met": gap["median"] <= HIT_RATE_POINTS / 100})
        for other in COMPARED:
            for name in OURS:
                if name in systems and other in systems:
                    targets.append({"system": name, "target": f"beside {other}",
                                    "ratio": ratio(systems[name], systems[other], "output_throughput"),
                                    "ttft_p90_ratio": ratio(systems[name], systems[other], "ttft_p90_ms"), "met": None})
        report[label] = {"systems": rows, "targets": targets}
    return report


def _cell(value: dict, digits: int = 0, scale: float = 1.0) -> str:
    if value["n"] == 0:
        return "-"
    median = f"{value['median'] * scale:,.{digits}f}"
    if value["n"] == 1:
        return median
    return f"{median} ({value['min'] * scale:,.{digits}f}-{value['max'] * scale:,.{digits}f})"


def markdown(report: dict, title: str) -> str:
    lines = [f"# {title or 'Routing across replicas'}", "",
             "Medians over rounds, (min-max) where there were several. Hit rate: the engines' own "
             "`vllm:prefix_cache_hits` over `_queries`, all replicas; ideal: what a perfect router could "
             "reach (bench/chat_load.py). Requests per replica: `vllm:request_success` of each, per round.", ""]
    for label, part in report.items():
        lines += [f"## {label}", "",
                  "| system | output tok/s | TTFT p50 (ms) | TTFT p90 (ms) | hit rate % | ideal % | requests per replica | failed |",
                  "|---|---|---|---|---|---|---|---|"]
        for system, row in part["systems"].items():
            per_replica = "; ".join("/".join(str(n) for n in counts) for counts in row["requests_per_replica"])
            lines.append(f"| {system} | {_cell(row['output_throughput'])} | {_cell(row['ttft_p50_ms'])} | "
                         f"{_cell(row['ttft_p90_ms'])} | {_cell(row['hit_rate'], 1, 100)} | "
                         f"{_cell(row['ideal_hit_rate'], 1, 100)} | {per_replica} | {row['failed']} |")
        decided = {system: row["routing_reasons"] for system, row in part["systems"].items() if "routing_reasons" in row}
        if decided:
            lines += ["", f"`kv` decisions by reason ({'/'.join(ROUTING_REASONS)}), per round: " + "; ".join(
                f"{system} " + ", ".join("/".join(f"{rounds.get(reason, 0):.0f}" for reason in ROUTING_REASONS)
                                         for rounds in per_round) for system, per_round in decided.items())]
        if part["targets"]:
            lines += ["", "| system | target | measured | met |", "|---|---|---|---|"]
            for target in part["targets"]:
                if "gap_points" in target:
                    gap = target["gap_points"]
                    measured = f"{gap['median']:.1f} points under it ({gap['min']:.1f} to {gap['max']:.1f}; negative: above)"
                else:
                    measured = f"{_cell(target['ratio'], 3)}x"
                    if "ttft_p90_ratio" in target:
                        measured += f" throughput, {_cell(target['ttft_p90_ratio'], 3)}x TTFT p90"
                met = {True: "yes", False: "**no**", None: ""}[target["met"]]
                lines.append(f"| {target['system']} | {target['target']} | {measured} | {met} |")
        lines.append("")
    return "\n".join(lines)


def summary(results: Path, out: Path, title: str = "") -> tuple[dict, str]:
    report = analyse(load(results))
    meta = results / "meta.json"
    return {"meta": json.loads(meta.read_text()) if meta.exists() else {}, "report": report}, markdown(report, title)
