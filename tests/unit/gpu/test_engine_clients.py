"""services/gpu/engine_clients.py without an engine: the sockets each engine client binds, the run
directory the workers share, the engine's load summed over the workers, and how the engine process
starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.servers import ROOT, parse_cpus, parse_target
from services.gpu import engine_clients, llm_service
from services.config import Settings
from services.gpu.engine_clients import EngineClientSlot, EngineLoad


def test_each_engine_client_has_its_own_sockets_in_the_run_directory(tmp_path: Path):
    slot = EngineClientSlot(run_dir=tmp_path, count=3, index=1)
    addresses = [slot.addresses(i) for i in range(3)]
    every = [a for pair in addresses for a in pair.values()]
    assert len(set(every)) == 6
    assert all(a.startswith(f"ipc://{tmp_path}/") for a in every)
    assert not slot.launches_engine and EngineClientSlot(tmp_path, 3, 0).launches_engine


def test_the_socket_paths_fit_a_unix_socket(monkeypatch):
    """At most 107 bytes: the run directory is a short temp folder."""
    monkeypatch.delenv(engine_clients.RUN_DIR_ENV, raising=False)
    engine_clients.share_run_dir()
    slot = EngineClientSlot(Path(os.environ[engine_clients.RUN_DIR_ENV]), count=64, index=63)
    assert len(slot.addresses(63)["output_address"].removeprefix("ipc://")) < 107


def test_the_run_directory_is_made_once_and_then_inherited(monkeypatch):
    monkeypatch.delenv(engine_clients.RUN_DIR_ENV, raising=False)
    engine_clients.share_run_dir()
    first = os.environ[engine_clients.RUN_DIR_ENV]
    engine_clients.share_run_dir()  # a worker importing the module again keeps its parent's
    assert os.environ[engine_clients.RUN_DIR_ENV] == first and Path(first).is_dir()


def test_the_run_directory_goes_when_the_process_that_made_it_exits():
    code = ("import os; from services.gpu import engine_clients as e; e.share_run_dir(); "
            "d = os.environ[e.RUN_DIR_ENV]; open(os.path.join(d, 'engine.json'), 'w').write('{}'); print(d)")
    env = {k: v for k, v in os.environ.items() if k != engine_clients.RUN_DIR_ENV}
    made = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    run_dir = Path(made.stdout.strip())
    assert made.returncode == 0 and run_dir.name.startswith("pipeline-engine-"), made.stderr
    assert not run_dir.exists()


def test_the_engine_load_is_the_sum_over_the_workers(tmp_path: Path):
    workers = [EngineLoad(EngineClientSlot(tmp_path, 3, index)) for index in range(3)]
    assert [w.total() for w in workers] == [0, 0, 0]
    workers[0].add(+1)
    workers[0].add(+1)
    for _ in range(5):
        workers[2].add(+1)
    assert [w.total() for w in workers] == [7, 7, 7]
    for _ in range(5):
        workers[2].add(-1)
    assert workers[1].total() == 2


def test_one_engine_client_counts_its_own_requests():
    alone = EngineLoad(None)
    for _ in range(3):
        alone.add(+1)
    assert alone.total() == 3


@pytest.mark.parametrize("target, parsed", [("vllm", ("vllm", None)), ("vllm-api8", ("vllm", 8)),
                                            ("pipeline", ("pipeline", None)), ("pipeline-ec4", ("pipeline", 4))])
def test_benchmark_targets(target, parsed):
    assert parse_target(target) == parsed


@pytest.mark.parametrize("target", ["vllm-ec2", "pipeline-api2", "pipeline-ec0", "sglang"])
def test_unknown_benchmark_targets_are_refused(target):
    with pytest.raises(ValueError):
        parse_target(target)


def test_cpu_lists_read_as_taskset_does():
    assert parse_cpus("0-1,4") == {0, 1, 4} and parse_cpus("3") == {3}


def test_pinning_moves_every_thread_of_a_process():
    import threading

    import psutil

    from bench.servers import pin

    mine = os.sched_getaffinity(0)
    started = threading.Event()
    worker = threading.Thread(target=started.wait, daemon=True)
    worker.start()
    try:
        assert pin([psutil.Process()], {min(mine)}) >= 2  # the main thread and the worker
        assert os.sched_getaffinity(worker.native_id) == {min(mine)}
    finally:
        pin([psutil.Process()], mine)
        started.set()


def test_the_other_workers_wait_for_the_engine_and_learn_why_it_did_not_start(tmp_path: Path):
    from services.gpu.engine_clients import ENGINE_FILE, _wait_for_engine

    engine_file = tmp_path / ENGINE_FILE
    with pytest.raises(RuntimeError, match="did not start the engine within 0 s"):
        _wait_for_engine(engine_file, timeout_s=0.3)
    engine_file.write_text(json.dumps({"pid": os.getpid()}))
    assert _wait_for_engine(engine_file, timeout_s=1) == os.getpid()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    engine_file.write_text(json.dumps({"pid": gone.pid}))  # an engine that has exited since: wait for the next
    with pytest.raises(RuntimeError, match="did not start the engine"):
        _wait_for_engine(engine_file, timeout_s=0.5)
    engine_file.write_text('{"error": "ValueError: out of GPU memory"}')
    with pytest.raises(RuntimeError, match="worker 1 could not start the engine: ValueError: out of GPU memory"):
        _wait_for_engine(engine_file, timeout_s=60)  # at once, not after the timeout


def test_the_engine_starts_as_a_fresh_interpreter_as_vllm_serve_starts_it(tmp_path: Path, monkeypatch):
    """LLMService's engine arguments come with vLLM's start method set to spawn, unless set outside."""
    monkeypatch.setattr(llm_service, "is_cpu_build", lambda: False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    llm_service.engine_args(Settings(model=str(tmp_path)))
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    llm_service.engine_args(Settings(model=str(tmp_path)))
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
