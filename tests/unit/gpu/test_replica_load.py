"""The load LLMService reports to the front's routers (its /kv_events `load` frames): how many
requests the engine holds is counted exactly by its workers; the scheduler's stats, which lag and
go stale when the engine idles, only split them and give the KV usage."""

from __future__ import annotations

from pathlib import Path

from services.gpu.engine_clients import EngineLoad
from services.gpu.engine_stats import EngineStats
from services.gpu.llm_service import LLMService
from services.protocol import ReplicaLoad


def service_with(tmp_path: Path, *, held: int, running: int, waiting: int, kv_usage: float, prefill: int = 0):
    service = object.__new__(LLMService.inner)
    service.engine_stats = EngineStats(tmp_path, count=1, index=0)
    service.engine_stats.record(running, waiting, kv_usage)
    service.engine_load = EngineLoad(None)
    service.engine_load.add(held, prefill_tokens=prefill)
    return service


def test_an_idle_engine_reports_nothing_running_whatever_its_last_step_said(tmp_path: Path):
    # the last step before the engine idled still counted the four requests it finished
    idle = service_with(tmp_path, held=0, running=4, waiting=0, kv_usage=0.3)
    assert idle.replica_load() == ReplicaLoad(running=0, waiting=0, kv_usage=0.0)


def test_requests_not_yet_in_a_step_count_as_running_and_the_stats_split_the_rest(tmp_path: Path):
    # seven requests held; the last stats (before two of them arrived) said 2 running, 3 waiting
    busy = service_with(tmp_path, held=7, running=2, waiting=3, kv_usage=0.4)
    assert busy.replica_load() == ReplicaLoad(running=4, waiting=3, kv_usage=0.4)
    few = service_with(tmp_path, held=1, running=0, waiting=5, kv_usage=0.1)  # stale waiting: at most what is held
    assert few.replica_load() == ReplicaLoad(running=0, waiting=1, kv_usage=0.1)


def test_the_prompt_tokens_not_yet_prefilled_are_the_engines_queued_work(tmp_path: Path):
    busy = service_with(tmp_path, held=3, running=1, waiting=2, kv_usage=0.2, prefill=5000)
    assert busy.replica_load().prefill_tokens == 5000
