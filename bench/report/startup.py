"""The `startup` report: per target and cache (cold, warm) the median, min and max over its starts
of every figure starts.jsonl holds: to ready and to the first token, the first request's pace, the
engine clients' lag behind the engine, and the breakdown by phase (bench/startup_log.py).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

SHOWN = ("ready_s", "first_token_s", "ttft_first_ms", "ttft_next_ms", "engine_up_s", "ready_after_engine_s",
         "all_clients_after_engine_s")


def figures(start: dict) -> dict[str, float]:
    """One start's figures, flat: its own, its clients' (from when their log lines arrived) and its
    breakdown's (`breakdown.<phase>`)."""
    found = {name: start[name] for name in ("ready_s", "first_token_s", "ttft_first_ms", "ttft_next_ms")
             if isinstance(start.get(name), (int, float))}
    clients = start.get("clients") or {}
    if "engine_ready" in clients:
        found["engine_up_s"] = clients["engine_ready"]
    if "ready_after_engine_s" in clients:
        found["ready_after_engine_s"] = clients["ready_after_engine_s"]
    lags = clients.get("clients_after_engine_s") or {}
    for number, lag in lags.items():
        found[f"client_{number}_after_engine_s"] = lag
    if lags:
        found["all_clients_after_engine_s"] = max(lags.values())
    found |= {f"breakdown.{phase}": seconds for phase, seconds in (start.get("breakdown") or {}).items()}
    return found


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def medians(starts: list[dict]) -> dict[str, dict[str, dict]]:
    """`<target> <cache>` -> figure -> its spread over the starts that measured it."""
    groups: dict[str, list[dict]] = {}
    for start in starts:
        if "error" not in start:
            groups.setdefault(f"{start['target']} {start['cache']}", []).append(figures(start))
    return {group: {name: spread([f[name] for f in found if name in f])
                    for name in sorted({name for f in found for name in f})} for group, found in groups.items()}


def markdown(table: dict[str, dict[str, dict]], failed: int, title: str) -> str:
    names = [name for name in SHOWN if any(name in row for row in table.values())]
    names += sorted({name for row in table.values() for name in row if name.startswith("breakdown.")})
    heading = title or "A new replica's start"
    lines = [f"### {heading}", "",
             "Seconds (ms where named so): median (min-max) over the starts, n starts.", "",
             "| target, cache | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for group, row in table.items():
        n = max(value["n"] for value in row.values())
        cells = [f"{row[name]['median']:.2f} ({row[name]['min']:.2f}-{row[name]['max']:.2f})" if name in row else "-"
                 for name in names]
        lines.append(f"| {group} | {n} | " + " | ".join(cells) + " |")
    if failed:
        lines += ["", f"{failed} start(s) failed: their errors are in starts.jsonl."]
    return "\n".join(lines) + "\n"


def summary(results: Path, out: Path, title: str = "") -> tuple[dict, str]:
    meta = json.loads((results / "meta.json").read_text()) if (results / "meta.json").exists() else {}
    if (results / "serve-sh.json").exists():  # `--serve-sh`: one measurement, shown as it is
        found = json.loads((results / "serve-sh.json").read_text())
        rows = "\n".join(f"| {name} | {value} |" for name, value in found.items())
        return {"meta": meta, "serve_sh": found}, f"### ./scripts/serve.sh\n\n| figure | value |\n|---|---|\n{rows}\n"
    starts = [json.loads(line) for line in (results / "starts.jsonl").read_text().splitlines() if line.strip()]
    table = medians(starts)
    failed = sum("error" in start for start in starts)
    return {"meta": meta, "medians": table, "failed": failed}, markdown(table, failed, title)
