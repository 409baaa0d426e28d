"""`python -m bench` without engines: its parser, the phase table, where results go, and the report
writer on recorded runs (the runs themselves: tests/integration/test_bench_dry_runs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli, phases, report, results, serve
from harness import ROOT


def test_the_command_lists_every_subcommand():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert all(name in done.stdout for name in ("serve", "routing", "startup", "costs", "lora", "structured", "report",
                                                "phases"))


def test_a_wrong_target_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--targets", "pipeline-x2"])
    args = cli.build_parser().parse_args(["startup", "--targets", "pipeline-ec2@before", "vllm-api4"])
    assert args.targets == ["pipeline-ec2@before", "vllm-api4"]


def test_shared_groups_keep_each_subcommands_defaults():
    parse = cli.build_parser().parse_args
    assert parse(["serve"]).max_model_len == 4096 and parse(["serve"]).cpu_kvcache_gib == 2
    assert parse(["routing"]).ready_timeout == 900 and parse(["routing"]).cpu_kvcache_gib == 1
    assert parse(["structured"]).max_model_len == 2048 and parse(["structured"]).dtype == "auto"


def knobs(tmp_path: Path, **changes) -> phases.Knobs:
    values = dict(results=tmp_path / "R", models=tmp_path / "models", caches=tmp_path / "caches", rounds=3, devices=[],
                  share_gpu=False, side_by_side=False, label="H100", cpus=16)
    return phases.Knobs(**(values | changes))


@pytest.mark.parametrize("changes", [{}, {"share_gpu": True}, {"rounds": 1}, {"devices": ["0", "1"]}])
def test_every_phase_is_a_command_its_subcommand_accepts(tmp_path: Path, changes: dict):
    parser = cli.build_parser()
    table = phases.table(knobs(tmp_path, **changes))
    assert set(table) == {"llama7b", "smol", "tp2", "clients", "pinned2", "pinned4", "pinned_half", "features", "unit", "startup_smol",
                          "startup_llama7b", "ttft1", "repeats", "spread", "routing", "routing_tight", "routing4", "routing4_tight",
                          "costs"}
    for name, phase in table.items():
        if phase.argv[:2] != ["-m", "bench"]:
            assert (ROOT / phase.argv[0]).exists() or phase.argv[:2] == ["-m", "pytest"], name
            continue
        args = parser.parse_args(phase.argv[2:])
        assert args.out == tmp_path / "R" / name
        if args.module is serve:
            serve.check(parser, args)  # exits on arguments that contradict each other


def test_the_published_phases_keep_their_shapes_and_loads(tmp_path: Path):
    table = phases.table(knobs(tmp_path, share_gpu=True))
    argv = table["llama7b"].argv
    assert argv[argv.index("--concurrency") + 1:argv.index("--min-prompts")] == ["1", "4", "16", "64"]
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(26 << 30)
    routing = table["routing_tight"].argv
    assert routing[routing.index("--kv-cache-memory-bytes") + 1] == str(11 << 30)
    assert table["tp2"].env == {"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}
    assert phases.command(table["smol"], ["--cpu"])[-1] == "--cpu" and phases.command(table["costs"], ["--cpu"])[-1] != "--cpu"


def test_a_results_folder_is_new_for_each_run(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    first = results.results_folder(None, "serve")
    (first / "meta.json").write_text("{}")
    second = results.results_folder(None, "serve")
    assert first.name.endswith("-serve") and second.name == first.name + "-2"
    assert results.results_folder(tmp_path / "mine", "serve") == tmp_path / "mine"


def run_record(target: str, throughput_tokens: int, ttft_s: float, c: int = 4) -> dict:
    requests = {"error": [""] * 2, "output_len": [throughput_tokens // 2] * 2, "ttft_s": [ttft_s] * 2,
                "latency_s": [1.0] * 2, "itl_s": [[0.01]] * 2, "prompt_len": [512] * 2, "start_s": [0.0, 0.0]}
    return {"target": target, "duration_s": 1.0, "requests": requests, "workload": {"concurrency": c},
            "cpu": {}, "server_metrics": {}}


def serve_results(folder: Path) -> Path:
    (folder / "runs").mkdir(parents=True)
    meta = {"machine": {"gpus": []}, "engine": {"model": "/nowhere", "served_name": "smol", "cpu": True}}
    (folder / "meta.json").write_text(json.dumps(meta))  # as an older run wrote it: no "question"
    for target, tokens, ttft in (("pipeline", 100, 0.05), ("vllm", 100, 0.04)):
        (folder / "runs" / f"{target}-c4.json").write_text(json.dumps(run_record(target, tokens, ttft)))
    return folder


def test_the_report_of_a_serve_run_compares_the_servers(tmp_path: Path):
    folder = serve_results(tmp_path / "serve")
    assert report.question(folder) == "serve"
    report.write_summary(folder)
    found = json.loads((folder / "summary.json").read_text())
    (row,) = found["rows"]
    assert row["output_throughput_ratio"] == 1.0 and row["ttft_p50_delta_ms"] == pytest.approx(10.0)
    assert "| 4 | output tok/s | 100 | 100 | 1.000 |" in (folder / "summary.md").read_text()


def test_the_report_of_a_startup_run_gives_medians_per_target_and_cache(tmp_path: Path):
    starts = [{"target": "pipeline-ec2", "cache": "warm", "ready_s": ready, "first_token_s": ready + 0.2,
               "clients": {"engine_ready": ready - 1, "clients_after_engine_s": {"1": 0.8, "2": lag}},
               "breakdown": {"engine_init_s": 10.0}} for ready, lag in ((26.0, 0.9), (27.0, 0.8), (29.0, 1.1))]
    starts.append({"target": "vllm-api2", "cache": "cold", "error": "TimeoutError: not ready"})
    (tmp_path / "starts.jsonl").write_text("".join(json.dumps(start) + "\n" for start in starts))
    report.write_summary(tmp_path)
    found = json.loads((tmp_path / "summary.json").read_text())
    warm = found["medians"]["pipeline-ec2 warm"]
    assert warm["ready_s"] == {"median": 27.0, "min": 26.0, "max": 29.0, "n": 3}
    assert warm["all_clients_after_engine_s"]["median"] == 0.9 and warm["breakdown.engine_init_s"]["n"] == 3
    assert found["failed"] == 1 and "1 start(s) failed" in (tmp_path / "summary.md").read_text()


def test_the_report_command_writes_one_summary_per_phase_folder(tmp_path: Path):
    serve_results(tmp_path / "R" / "smol")
    (tmp_path / "R" / "costs").mkdir()
    (tmp_path / "R" / "costs" / "meta.json").write_text(json.dumps({"question": "costs"}))
    (tmp_path / "R" / "costs" / "summary.json").write_text(json.dumps({"cpu_tier_per_core": {"frames": {"x": 1}}}))
    (tmp_path / "R" / "progress.log").write_text("")
    args = cli.build_parser().parse_args(["report", str(tmp_path / "R")])
    assert args.module.run(args) == 0
    assert (tmp_path / "R" / "smol" / "summary.md").exists()
    assert "| cpu_tier_per_core.frames.x | 1 |" in (tmp_path / "R" / "costs" / "summary.md").read_text()


def test_the_fleet_subcommand_measures_a_small_fleet(tmp_path):
    """`python -m bench fleet` on a few stand-in replicas: a decision time per prompt length, and
    the index's memory, for each fleet size."""
    from bench.cli import main

    assert main(["fleet", "--replicas", "2", "3", "--blocks", "300", "--documents", "20", "--decisions", "5",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["replicas"] for row in summary["results"]] == [2, 3]
    for row in summary["results"]:
        assert set(row["decision"]) == {"2k", "8k", "32k"}
        assert 0 < row["decision"]["8k"]["p50_ms"] and row["index_memory_mb"] > 0
