"""The start-up breakdown read from a server's log (bench/startup_log.py) and the repeated runs'
medians and ratios (bench/report/repeats.py)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from bench.report import repeats
from bench.startup_log import client_phases, follow, phases

LOG = """=== python -m bentoml_cli._internal.start start-http-server . --service-name LLMService
2026-11-29T17:15:56+0000 [INFO] [cli] Starting production HTTP BentoServer
(EngineCore pid=15292) INFO 11-29 17:16:58 [core.py:116] Initializing a V1 LLM engine (v0.26.0) with config: ...
(EngineCore pid=15292) INFO 11-29 17:17:03 [model_runner.py:305] Model loading took 12.81 GiB and 3.952515 seconds
(EngineCore pid=15292) INFO 11-29 17:17:13 [backends.py:1155] Dynamo bytecode transform time: 9.30 s
(EngineCore pid=15292) INFO 11-29 17:17:29 [monitor.py:53] torch.compile took 25.37 s in total
(EngineCore pid=15292) INFO 11-29 17:17:37 [model_runner.py:747] Graph capturing finished in 6 secs, took 52.79 GiB
(EngineCore pid=15292) INFO 11-29 17:17:47 [core.py:340] init engine (profile, create kv cache, warmup model) took 43.14 s (compilation: 25.37 s)
2026-11-29T17:17:49+0000 [INFO] [service:LLMService:5] engine ready: model='llama7b'
2026-11-29T17:17:50+0000 [INFO] [service:LLMService:1] engine ready: model='llama7b'
"""


def test_the_breakdown_comes_from_the_log_lines_and_vllms_own_durations(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")  # vLLM's timestamps are local time; this log's are UTC
    time.tzset()
    try:
        found = phases(LOG, datetime.fromisoformat("2026-11-29T17:15:55+00:00").timestamp())
    finally:
        monkeypatch.undo()
        time.tzset()
    assert found["first_log_line"] == 1.0
    assert found["engine_core_start"] == 63.0
    assert found["engine_ready"] == 112.0
    assert found["clients_ready"] == 115.0  # the last worker's
    assert (found["weights_s"], found["dynamo_s"], found["torch_compile_s"], found["cuda_graphs_s"]) == (3.952515, 9.3, 25.37, 6.0)
    assert found["init_engine_s"] == 43.14
    assert "compile_load_s" not in found


def test_the_engine_clients_lag_behind_the_engine_from_when_the_lines_arrived(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text("=== start\n")
    started_at = time.time()
    with follow(log, every_s=0.01) as arrivals:
        with log.open("a") as out:
            for line, pause_s in [(LOG.splitlines()[2], 0.05), (LOG.splitlines()[7], 0.3),
                                  ("2026-11-29T17:17:50+0000 [INFO] [service:LLMService:2] engine client 2 of 2 "
                                   "connected to the EngineCore (pid 15292)", 0.2),
                                  ("2026-11-29T17:17:50+0000 [INFO] [service:LLMService:1] engine client 1 of 2 "
                                   "connected to the EngineCore (pid 15292)", 0.0)]:
                time.sleep(pause_s)
                out.write(line + "\n")
                out.flush()
        time.sleep(0.1)
    found = client_phases(arrivals, started_at)
    assert list(found["clients_connected"]) == ["1", "2"]
    assert 0.25 <= found["engine_ready"] - found["engine_core_start"] <= 0.5  # not the lines' whole seconds
    lag = found["clients_after_engine_s"]
    assert 0.15 <= lag["2"] <= 0.35 and 0.15 <= lag["1"] <= 0.35


def _run(folder: Path, target: str, c: int, round_index: int, throughput_tokens: int, ttft_s: float) -> None:
    requests = {"error": [""] * 2, "output_len": [throughput_tokens // 2] * 2, "ttft_s": [ttft_s] * 2,
                "latency_s": [1.0] * 2, "itl_s": [[0.01]] * 2, "prompt_len": [512] * 2}
    record = {"target": target, "duration_s": 1.0, "requests": requests, "workload": {"concurrency": c}}
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    (folder / "runs" / f"{target}-c{c}-r{round_index}.json").write_text(json.dumps(record))


def test_repeated_runs_give_medians_spread_and_round_by_round_ratios(tmp_path: Path):
    for k, (pipe, ref) in enumerate([(100, 100), (110, 100), (90, 120)], 1):
        _run(tmp_path, "pipeline-ec8", 64, k, pipe, 0.05)
        _run(tmp_path, "vllm-api8", 64, k, ref, 0.04)
    runs = repeats.load(tmp_path)
    rows = {row["target"]: row for row in repeats.table(runs)}
    assert rows["pipeline-ec8"]["output_throughput"] | {"values": None} == {
        "median": 100, "min": 90, "max": 110, "n": 3, "values": None}
    (ratio,) = repeats.ratios(runs)
    assert ratio["ratio_of_medians"] == 1.0
    assert ratio["ratio_by_round"]["values"] == [1.0, 1.1, 0.75]
    assert round(ratio["ttft_p50_difference_ms_by_round"]["median"], 6) == 10.0
    assert "| 64 | pipeline-ec8 / vllm-api8 | 1.000 | 1.000 (0.750-1.100)" in repeats.markdown(list(rows.values()), [ratio])
