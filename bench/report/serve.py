"""The `serve` report: for every figure the pipeline's value, vLLM's and their ratio, the best
configuration of each server where several ran, and issue 5's targets; with rounds, the medians
(repeats.py). `plots.png`: throughput and latencies against concurrency, both servers.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from bench.metrics import errors, summarize
from bench.report import repeats

# the figures shown in table.md and plots.png; comparison.json has them all
TABLE = [
    ("output_throughput", "output tok/s"),
    ("request_throughput", "req/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("tpot_p50_ms", "TPOT p50 ms"),
    ("itl_p50_ms", "ITL p50 ms"),
    ("itl_p99_ms", "ITL p99 ms"),
    ("e2el_p50_ms", "E2E p50 ms"),
    ("e2el_p99_ms", "E2E p99 ms"),
]
TARGETS = ("pipeline", "vllm")


def load_runs(results: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted((results / "runs").glob("*-c*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["target"], {})[record["workload"]["concurrency"]] = record
    return runs


def _ratio(a: float, b: float) -> float | None:
    if b in (0, None) or a is None or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def compare(runs: dict[str, dict[int, dict]]) -> list[dict]:
    levels = sorted(set().union(*(set(r) for r in runs.values())))
    rows = []
    for c in levels:
        figures = {t: summarize(runs[t][c]) for t in TARGETS if c in runs.get(t, {})}
        if not figures:
            continue
        row: dict = {"concurrency": c, "figures": {}, "errors": {}, "cpu": {}, "server_metrics": {}}
        for name in next(iter(figures.values())):
            entry = {t: figures[t][name] for t in figures}
            if len(figures) == 2:
                entry["ratio"] = _ratio(figures["pipeline"][name], figures["vllm"][name])
            row["figures"][name] = entry
        for t in figures:
            row["errors"][t] = errors(runs[t][c])
            row["cpu"][t] = runs[t][c]["cpu"]
            row["server_metrics"][t] = runs[t][c].get("server_metrics", {})
        if len(figures) == 2:
            f = row["figures"]
            row["output_throughput_ratio"] = f["output_throughput"]["ratio"]
            row["request_throughput_ratio"] = f["request_throughput"]["ratio"]
            row["ttft_p50_delta_ms"] = f["ttft_p50_ms"]["pipeline"] - f["ttft_p50_ms"]["vllm"]
            row["itl_p50_ratio"] = f["itl_p50_ms"]["ratio"]
            row["tpot_p50_ratio"] = f["tpot_p50_ms"]["ratio"]
        rows.append(row)
    return rows


def best_configurations(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """Every configuration of each server (`pipeline-ecN`, `vllm-apiN`, ...) at each level, and the
    best pipeline's ratio to the best vLLM configuration and to vLLM's default (`vllm`) where measured."""
    rows = []
    for c in sorted(set().union(*(set(r) for r in runs.values()))):
        figures = {t: summarize(runs[t][c]) for t in sorted(runs) if c in runs[t]}
        best = {}
        for kind in ("pipeline", "vllm"):
            mine = [t for t in figures if t.split("-")[0] == kind]
            if mine:
                best[kind] = max(mine, key=lambda t: figures[t]["output_throughput"])
        row = {"concurrency": c, "best": best,
               "configs": {t: {k: f[k] for k in ("output_throughput", "ttft_p50_ms", "tpot_p50_ms", "failed")}
                           for t, f in figures.items()}}
        if len(best) == 2:
            ours, theirs = figures[best["pipeline"]], figures[best["vllm"]]
            row["throughput_ratio_to_best_vllm"] = _ratio(ours["output_throughput"], theirs["output_throughput"])
            row["ttft_p50_delta_ms_to_best_vllm"] = ours["ttft_p50_ms"] - theirs["ttft_p50_ms"]
            if "vllm" in figures:
                row["throughput_ratio_to_vllm_default"] = _ratio(ours["output_throughput"], figures["vllm"]["output_throughput"])
        rows.append(row)
    return rows


def configurations_markdown(rows: list[dict], title: str) -> str:
    lines = [f"### {title}" if title else "", "", "| c | server | output tok/s | TTFT p50 ms | TPOT p50 ms | failed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for target, f in r["configs"].items():
            mark = " (best)" if target in r["best"].values() else ""
            lines.append(f"| {r['concurrency']} | {target}{mark} | {_fmt(f['output_throughput'], 'output_throughput')} | "
                         f"{_fmt(f['ttft_p50_ms'])} | {_fmt(f['tpot_p50_ms'])} | {f['failed']} |")
    lines += ["", "| c | best pipeline / best vLLM (throughput) | TTFT p50 difference ms | best pipeline / `vllm serve` default |",
              "|---|---|---|---|"]
    for r in rows:
        ratio, default = r.get("throughput_ratio_to_best_vllm"), r.get("throughput_ratio_to_vllm_default")
        delta = r.get("ttft_p50_delta_ms_to_best_vllm")
        lines.append(f"| {r['concurrency']} | {'-' if ratio is None else f'{ratio:.3f}'} | "
                     f"{'-' if delta is None else f'{delta:+.1f}'} | {'-' if default is None else f'{default:.3f}'} |")
    return "\n".join(lines).strip() + "\n"


def check_targets(rows: list[dict], gpu: bool, small_model: bool) -> list[dict]:
    """Issue 5's targets, where this run has the figures to judge them."""
    checks = []
    pairs = [r for r in rows if "output_throughput_ratio" in r]
    for r in pairs:
        c = r["concurrency"]
        checks.append({"target": f"output throughput >= 98% of vLLM at c={c}", "value": r["output_throughput_ratio"],
                       "met": r["output_throughput_ratio"] >= 0.98})  # fmt: skip
        # a lower ITL than vLLM's is no cost: the target bounds the pipeline's excess
        checks.append({"target": f"ITL p50 at most 3% above vLLM at c={c} (ratio)", "value": r["itl_p50_ratio"],
                       "met": r["itl_p50_ratio"] <= 1.03})  # fmt: skip
        if gpu and c == 1:
            checks.append({"target": "TTFT p50 at most 5 ms above vLLM at c=1 (ms above)", "value": r["ttft_p50_delta_ms"],
                           "met": r["ttft_p50_delta_ms"] <= 5})  # fmt: skip
        if gpu and small_model and c == 256:
            checks.append({"target": "output throughput > 1.2x vLLM at c=256 (small model)",
                           "value": r["output_throughput_ratio"], "met": r["output_throughput_ratio"] > 1.2})  # fmt: skip
    return checks


def loadgen_check(rows: list[dict]) -> list[dict]:
    """The load generator's CPU use per run: mean and peak % of one core per process."""
    out = []
    for r in rows:
        for target, cpu in r["cpu"].items():
            gens = {k: v for k, v in cpu.items() if k.startswith("loadgen:")}
            if gens:
                out.append({
                    "concurrency": r["concurrency"], "target": target, "processes": len(gens),
                    "mean_pct_max": max(v["mean"] for v in gens.values()),
                    "peak_pct_max": max(v["max"] for v in gens.values()),
                })  # fmt: skip
    return out


def _fmt(value: float | None, name: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if name.endswith("throughput"):
        return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:,.0f}"


def markdown(rows: list[dict], checks: list[dict], gen: list[dict], title: str) -> str:
    lines = [f"### {title}" if title else "", ""]
    head = "| c | figure | pipeline | vLLM | ratio |"
    lines += [head, "|---|---|---|---|---|"]
    for r in rows:
        for name, label in TABLE:
            e = r["figures"][name]
            ratio = e.get("ratio")
            lines.append(
                f"| {r['concurrency']} | {label} | {_fmt(e.get('pipeline'), name)} | {_fmt(e.get('vllm'), name)} | "
                f"{'-' if ratio is None else f'{ratio:.3f}'} |"
            )
        failed = {t: r["figures"]["failed"].get(t) for t in TARGETS}
        lines.append(f"| {r['concurrency']} | failed requests | {failed['pipeline']} | {failed['vllm']} | |")
    if checks:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {c['target']} | {c['value']:.3f} | {'yes' if c['met'] else '**no**'} |" for c in checks]
    timings = [(r["concurrency"], t, m) for r in rows for t, m in r["server_metrics"].items() if m]
    if timings:
        names = sorted({name for _, _, m in timings for name in m})
        lines += ["", "The servers' own means (ms, from their Prometheus histograms, bench/server_metrics.py):", ""]
        lines += ["| c | server | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        lines += [f"| {c} | {t} | " + " | ".join(_fmt(m.get(n)) for n in names) + " |" for c, t, m in timings]
    if gen:
        lines += ["", "Load generator CPU (% of one core, busiest process): ", "", "| c | server | processes | mean | peak |", "|---|---|---|---|---|"]
        lines += [f"| {g['concurrency']} | {g['target']} | {g['processes']} | {g['mean_pct_max']:.0f} | {g['peak_pct_max']:.0f} |" for g in gen]
    return "\n".join(lines).strip() + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("output_throughput", "output tokens/s"),
        ("ttft_p50_ms", "TTFT p50 (ms)"),
        ("itl_p50_ms", "ITL p50 (ms)"),
        ("e2el_p99_ms", "E2E latency p99 (ms)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    levels = [r["concurrency"] for r in rows]
    for ax, (name, label) in zip(axes.flat, panels):
        for target, style in (("vllm", "o--"), ("pipeline", "s-")):
            ys = [r["figures"][name].get(target) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(levels, [math.nan if y is None else y for y in ys], style, label=f"{target}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: Path, out: Path, title: str = "") -> tuple[dict, str]:
    """The comparison of a `serve` run (and, with rounds, the medians over them: repeats.py), and
    its markdown; plots.png beside it where matplotlib is installed."""
    meta = json.loads((results / "meta.json").read_text())
    runs = load_runs(results)
    rows = compare(runs)
    gpu = bool(meta["machine"]["gpus"]) and not meta["engine"].get("cpu")
    small = int(json.loads((Path(meta["engine"]["model"]) / "config.json").read_text()).get("hidden_size", 0)) < 1024 \
        if Path(meta["engine"]["model"]).is_dir() else "smol" in meta["engine"]["served_name"]
    checks = check_targets(rows, gpu, small)
    gen = loadgen_check(rows)
    result = {"meta": meta, "rows": rows, "targets": checks, "load_generator": gen}
    parts = []
    if rows and set(TARGETS) <= set(runs):  # the side-by-side table needs both plain targets
        parts.append(markdown(rows, checks, gen, title))
        if importlib.util.find_spec("matplotlib"):
            plot(rows, out / "plots.png", title)
    if set(runs) - set(TARGETS):  # several configurations of a server: compare the best of each
        result["configurations"] = best_configurations(runs)
        parts.append(configurations_markdown(result["configurations"], title))
    if rounds := repeats.load(results):  # several rounds: medians and spread, ratios round by round
        levels, ratios = repeats.table(rounds), repeats.ratios(rounds)
        result["repeats"] = {"levels": levels, "ratios": ratios}
        parts.append(repeats.markdown(levels, ratios))
    return result, "\n".join(parts)
