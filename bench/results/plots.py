"""Draws the pictures of docs/benchmarks.md from the summary.json files beside this script.

    python bench/results/plots.py        # writes docs/startup-7b.png and docs/routing-hit-rates.png

Each picture reads only figures the page cites, so a new results folder means a new path below.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent
DOCS = RESULTS.parent.parent / "docs"


def summary(folder: str) -> dict:
    return json.loads((RESULTS / folder / "summary.json").read_text())


def startup() -> None:
    """A new replica's start, split into where its seconds go (7B shape, one H200)."""
    # (label, EngineCore started, engine ready, ready, torch.compile, CUDA graphs, kernel warm-up), seconds
    steps = summary("2026-12-03-startup-h200")["figures"]["where_the_time_goes_s"]
    rows = [
        ("LLMService, cold cache", 78, 209, 210, 16.7, 5, 100),
        ("vllm serve, cold cache", 66.3, 190.3, 191.9, 17.6, 5, 93),
        ("LLMService, kept cache", 53, 76, 78, 6.2, 7, 1),
        ("vllm serve, kept cache", 46.9, 62.9, 65.15, 3.9, 4, 1),
    ]
    assert steps["ready"]["pipeline cold"] == 210 and steps["ready"]["pipeline warm"] == 78
    parts = [("Python: imports, processes, before the engine", "#9aa5b1"), ("weights, memory profile, KV cache", "#c7d2dc"),
             ("torch.compile", "#4c78a8"), ("CUDA graphs", "#72b7b2"), ("kernel warm-up (JIT)", "#e45756"),
             ("engine up to ready", "#f2cf5b")]
    fig, ax = plt.subplots(figsize=(8, 2.8), dpi=100)
    for y, (label, core, engine_ready, ready, compile_s, graphs, warmup) in enumerate(reversed(rows)):
        rest = engine_ready - core - compile_s - graphs - warmup
        widths = [core, rest, compile_s, graphs, warmup, ready - engine_ready]
        left = 0.0
        for (name, color), width in zip(parts, widths):
            ax.barh(y, width, left=left, color=color, label=name if y == 0 else None, height=0.6)
            left += width
        ax.text(left + 2, y, f"{ready:.0f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("seconds from process start to ready", fontsize=8)
    ax.set_xlim(0, 235)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    ax.set_title("A new replica's start, Llama-2-7B shape, one H200 (LLMService: one run each)", fontsize=9)
    fig.savefig(DOCS / "startup-7b.png", bbox_inches="tight")
    plt.close(fig)


def routing() -> None:
    """Prompt-token hit rates: the routers on one H100, and the prompt's home on the CPU."""
    gpu = summary("2026-12-06-routing-h100")["figures"]
    cpu = summary("2026-12-06-routing-cpu")["figures"]["home_hit_rate"]
    workloads = [("prefixes, c=32", gpu["kv16g"]["prefix c=32"]), ("prefixes, c=64", gpu["kv16g"]["prefix c=64"]),
                 ("multi-turn, c=16", gpu["kv16g"]["multiturn c=16"]), ("prefixes, c=32,\n11 GiB of KV", gpu["kv11g"]["prefix c=32"])]
    systems = [("pipeline kv", "#4c78a8"), ("pipeline round-robin", "#9ecae9"),
               ("vllm-router cache_aware", "#e45756"), ("vllm-router round_robin", "#ff9d98")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3), dpi=100, gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.2
    for i, (name, color) in enumerate(systems):
        xs = [w + (i - 1.5) * width for w in range(len(workloads))]
        left.bar(xs, [100 * runs[name][2] for _, runs in workloads], width, label=name, color=color)
    left.set_xticks(range(len(workloads)), [w for w, _ in workloads], fontsize=8)
    left.set_ylabel("prompt tokens from cache, %", fontsize=8)
    left.set_ylim(0, 100)
    left.tick_params(axis="y", labelsize=8)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    left.set_title("Two replicas, one H100, one run each (before the prompt's home)", fontsize=9)
    seeds = range(len(cpu["off"]))
    right.bar([s - 0.2 for s in seeds], [100 * v for v in cpu["off"]], 0.4, label="home off", color="#9ecae9")
    right.bar([s + 0.2 for s in seeds], [100 * v for v in cpu["on"]], 0.4, label="home on", color="#4c78a8")
    right.axhline(100 * cpu["ideal"], color="black", lw=0.8, ls="--", label="ideal")
    right.set_xticks(list(seeds), [f"prompts {s + 1}" for s in seeds], fontsize=8)
    right.set_ylim(0, 100)
    right.tick_params(axis="y", labelsize=8)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    right.set_title("4 front workers, CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "routing-hit-rates.png", bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    startup()
    routing()
