"""Every `python -m bench` subcommand, run briefly on the CPU engine so that none of them rots: a
few requests of a few tokens each, against the real servers each subcommand starts. The parts that
need the whole pipeline served (costs' round trips and LLMService's CPU per token, serve.sh's
memory and first token) use the session's pipeline instead of a start of their own.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from bench import cli, costs, startup
from harness import ROOT, Server

ENGINE = ["--cpu", "--max-model-len", "512", "--cpu-kvcache-gib", "1", "--prompt-workers", "1"]


def bench(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """`python -m bench ARGS` from the project folder; fails the test with its output's end unless rc 0."""
    done = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, f"python -m bench {' '.join(args)}: rc {done.returncode}\n{(done.stdout + done.stderr)[-4000:]}"
    return done


def summary(out: Path) -> dict:
    assert (out / "summary.md").read_text().strip()
    return json.loads((out / "summary.json").read_text())


def test_serve_drives_the_pipeline_through_vllm_bench_serve(tmp_path: Path):
    bench("serve", *ENGINE, "--targets", "pipeline-ec1", "--concurrency", "2", "--input-len", "16", "--output-len", "4",
          "--min-prompts", "4", "--prompts-per-concurrency", "1", "--warmup-concurrency", "0", "--out", str(tmp_path))
    record = json.loads((tmp_path / "runs" / "pipeline-ec1-c2.json").read_text())
    assert record["requests"]["error"] == [""] * 4 and record["requests"]["output_len"] == [4] * 4
    assert record["server_metrics"]["engine_ttft_mean_ms"] > 0  # LLMService's own metrics, on its socket
    assert summary(tmp_path)["configurations"][0]["configs"]["pipeline-ec1"]["failed"] == 0


def test_structured_times_the_first_token_of_each_kind_of_request(tmp_path: Path):
    bench("structured", *ENGINE, "--targets", "vllm-api1", "--requests", "2", "--max-tokens", "2", "--out", str(tmp_path))
    found = summary(tmp_path)["summary"]["vllm-api1"]  # `vllm serve` through harness/vllm_cli.py
    assert set(found) == {"plain", "schema, cached", "schema, new"}
    assert all(kind["median_ms"] > 0 for kind in found.values())


def test_startup_breaks_a_replicas_start_down(tmp_path: Path):
    bench("startup", "--cpu", "--targets", "pipeline-ec1", "--plan", "warm", "--prompt-len", "8", "--max-tokens", "2",
          "--next-requests", "1", "--out", str(tmp_path))
    (start,) = [json.loads(line) for line in (tmp_path / "starts.jsonl").read_text().splitlines()]
    assert "error" not in start and start["ready_s"] > 0 and start["tokens"] == 2
    assert set(start["breakdown"]) == {"launcher_s", "imports_and_config_s", "engine_imports_s", "engine_init_s", "to_ready_s"}
    assert summary(tmp_path)["medians"]["pipeline-ec1 warm"]["ready_s"]["n"] == 1


def test_what_serve_sh_starts_is_measured_per_service(pipeline: Server):
    memory = startup.service_memory(pipeline)
    assert set(memory) == {"PromptService", "LLMService"} and all(mib > 50 for mib in memory.values())
    assert startup.first_token_ms(pipeline.url, runs=1)["ttft_ms_p50"] > 0


def test_routing_measures_each_run_from_the_engines_counters(tmp_path: Path):
    bench("routing", *ENGINE, "--replicas", "1", "--systems", "pipeline-kv", "--workloads", "prefix:2", "multiturn:2",
          "--warmup-conversations", "0", "--prompts", "4", "--prefix-len", "32", "--suffix-len", "8", "--num-prefixes",
          "2", "--prefix-output-len", "2", "--conversations", "2", "--turns", "2", "--first-len", "16", "--turn-len", "8",
          "--turn-output-len", "2", "--out", str(tmp_path))
    runs = sorted(path.name for path in (tmp_path / "runs").glob("*.json"))
    assert runs == ["multiturn-c2-pipeline-kv-r1.json", "prefix-c2-pipeline-kv-r1.json"]
    report = summary(tmp_path)["report"]
    assert report["prefix-c2"]["systems"]["pipeline-kv"]["failed"] == 0
    assert report["prefix-c2"]["systems"]["pipeline-kv"]["requests_per_replica"] == [[4]]  # the engine's own count
    assert report["multiturn-c2"]["systems"]["pipeline-kv"]["requests_per_replica"] == [[4]]
    (reasons,) = report["prefix-c2"]["systems"]["pipeline-kv"]["routing_reasons"]  # the front's own word, each request
    assert sum(reasons.values()) == 4 and reasons["new"] >= 1


def test_costs_parts_that_start_their_own_servers(tmp_path: Path):
    bench("costs", "--parts", "cpu-tier", "front", "chunks", "--seconds", "0.05", "--concurrency", "2", "--input-len",
          "16", "--output-len", "4", "--prompts", "4", "--variants", "0", "--lines", "50", "--streams", "2",
          "--out", str(tmp_path))
    found = summary(tmp_path)
    assert found["cpu_tier_per_core"]["detokenize"]["1_per_push"]["tokens_per_s"] > 0
    assert found["front"]["failed"] == 0 and found["front"]["front_cpu_us_per_token"] > 0
    assert found["chunks"]["0"]["chunks"] == 100


def test_costs_counts_each_front_workers_calls_with_connections_spread_and_kept(tmp_path: Path):
    bench("costs", "--parts", "workers", "--prompt-workers", "2", "--concurrency", "4", "--requests-per-connection", "2",
          "--output-len", "2", "--out", str(tmp_path))
    found = summary(tmp_path)["workers"]
    for spread in ("false", "true"):
        run = found[f"spread_connections_{spread}"]
        assert run["ok"] == 8 and sum(run["calls_per_worker"]) == 8 and len(run["cpu_s_per_worker"]) == 2


def test_costs_round_trips_and_the_llm_tiers_cpu_per_token(pipeline: Server, tmp_path: Path):
    args = cli.build_parser().parse_args(["costs", "--cpu", "-n", "2", "--idle-s", "0.5", "--concurrency", "2",
                                          "--input-len", "16", "--output-len", "4", "--prompts", "4"])
    settings = cli.engine_settings(args)
    trips = asyncio.run(costs.round_trips(pipeline, [1, 2, 3], args.n))
    assert all(trips[kind]["n"] == 2 for kind in ("llm_model_info_direct", "pipeline_generate_1_token_token_ids"))
    found = costs.llm_tier_cost(pipeline, settings, args, tmp_path)
    assert found["failed"] == 0 and found["output_tokens"] == 16 and found["llmservice_cpu_us_per_token"] > 0


def test_lora_compares_an_adapter_with_the_base_model(tmp_path: Path):
    bench("lora", *ENGINE, "--no-reference", "--repeats", "1", "--concurrency", "2", "--requests", "3",
          "--output-tokens", "4", "--out", str(tmp_path))
    found = summary(tmp_path)["lora_pipeline"]
    assert set(found["one_at_a_time"]) == {"smollm2-135m-instruct", "a"}
    assert found["burst_three_adapters"]["requests"] == 3 and found["burst_three_adapters"]["output_tokens"] == 12


def test_phases_run_in_turn_and_say_so(tmp_path: Path):
    bench("phases", str(tmp_path), "costs", "--models", str(tmp_path / "models"))
    progress = (tmp_path / "progress.log").read_text()
    assert "phase costs starts" in progress and "phase costs ends, rc 0" in progress and "all done" in progress
    assert (tmp_path / "DONE").exists() and (tmp_path / "models" / "llama7b" / "config.json").exists()
    assert summary(tmp_path / "costs")["cpu_tier_per_core"]["frames"]["encode_per_s"] > 0
