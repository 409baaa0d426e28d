"""The one report writer: `summary.json` and `summary.md` for a results folder of any subcommand.

The folder's meta.json names its subcommand (`question`); serve.py, routing.py and startup.py make
the summaries of theirs from the raw runs, and costs, lora and structured runs write their
summary.json themselves (shown here as a table). A folder of phase folders gets one per phase.

    python -m bench report bench/results/2026-12-06-serve [--out FOLDER] [--title TEXT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.report import routing, serve, startup

SUMMARIES = {"serve": serve.summary, "routing": routing.summary, "startup": startup.summary}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, help="a results folder, or a folder of them (phases)")
    parser.add_argument("--out", type=Path, help="where summary.json and summary.md go (default: the results folder)")
    parser.add_argument("--title", default="", help="the markdown's heading")


def run(args: argparse.Namespace) -> int:
    if args.out and len(args.results) > 1:
        raise SystemExit("--out takes one results folder")
    for results in args.results:
        folders = [results] if is_results(results) else sorted(p for p in results.iterdir() if is_results(p))
        if not folders:
            raise SystemExit(f"{results}: no meta.json, runs/ or starts.jsonl here or in its folders")
        for folder in folders:
            out = write_summary(folder, args.out, args.title)
            print(f"{out / 'summary.md'}:\n\n{(out / 'summary.md').read_text()}")
    return 0


def is_results(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("meta.json", "runs", "starts.jsonl", "summary.json"))


def question(results: Path) -> str:
    """The subcommand that wrote `results`: meta.json says so; older folders are recognised by their files."""
    meta = results / "meta.json"
    if meta.exists() and (named := json.loads(meta.read_text()).get("question")):
        return named
    if (results / "starts.jsonl").exists() or (results / "serve-sh.json").exists():
        return "startup"
    runs = [path.name for path in (results / "runs").glob("*.json")]
    if any(routing.RUN_FILE.fullmatch(name) for name in runs):
        return "routing"
    if runs:
        return "serve"
    return "summary"  # a run that wrote its summary.json itself


def write_summary(results: Path, out: Path | None = None, title: str = "") -> Path:
    """summary.json and summary.md of `results`, into `out` (default: `results` itself)."""
    out = out or results
    out.mkdir(parents=True, exist_ok=True)
    kind = question(results)
    if kind in SUMMARIES:
        document, text = SUMMARIES[kind](results, out, title)
        (out / "summary.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    else:
        document = json.loads((results / "summary.json").read_text())
        if out != results:
            (out / "summary.json").write_text(json.dumps(document, indent=1) + "\n")
        text = table(document, title or f"{kind} summary")
    (out / "summary.md").write_text(text)
    return out


def table(document: dict, title: str) -> str:
    """A summary.json as one `| figure | value |` table, nested names joined with dots (the machine
    and lists of samples left out)."""
    rows = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                if name not in ("machine", "samples_s"):
                    walk(f"{prefix}.{name}" if prefix else str(name), inner)
        elif not isinstance(value, list):
            rows.append(f"| {prefix} | {value} |")

    walk("", document)
    return f"### {title}\n\n| figure | value |\n|---|---|\n" + "\n".join(rows) + "\n"
