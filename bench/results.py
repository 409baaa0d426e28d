"""Where a run's files go: `bench/results/<date>-<subcommand>/` unless `--out` says otherwise.

A run writes `meta.json` (the subcommand as `question`, the machine, the settings) and its raw
files (runs/, logs/: kept out of git); `python -m bench report` (or the run itself, at its end)
adds `summary.json` and `summary.md`, the small part that is committed.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from harness import ROOT

RESULTS = ROOT / "bench" / "results"


def results_folder(out: Path | None, question: str) -> Path:
    """`out`, or a new `bench/results/<date>-<question>[-N]/`; made if missing."""
    if out is None:
        stem = RESULTS / f"{time.strftime('%Y-%m-%d')}-{question}"
        out, n = stem, 1
        while out.exists() and any(out.iterdir()):
            n += 1
            out = stem.with_name(f"{stem.name}-{n}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def finish(out: Path, title: str, status: int) -> int:
    """The end of a run: its summary written (bench/report/), its folder named; the exit status."""
    from bench.report import write_summary

    try:
        write_summary(out, title=title)
    except Exception:  # noqa: BLE001 - the raw files are there; `python -m bench report` can try again
        traceback.print_exc()
        status = status or 1
    log(f"results: {out}")
    return status
