"""The engine goes with the worker that launched it, and a worker with its engine
(services/gpu/engine_watch.py), without an engine: real processes stand in for them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

from harness import ROOT, poll
from services.gpu import engine_clients, engine_watch

# A "worker" that starts an "engine" child watching it (as the EngineCore does) and prints its pid.
WORKER = textwrap.dedent("""
    import os, subprocess, sys
    engine = subprocess.Popen([sys.executable, "-c", ENGINE], env={**os.environ, "PARENT": str(os.getpid())})
    print(engine.pid, flush=True)
    engine.wait()
""")
ENGINE = textwrap.dedent("""
    import os, time
    from services.gpu.engine_watch import watch_parent
    watch_parent(int(os.environ["PARENT"]), every_s=0.05)  # as the engine learns it: it may be gone already
    time.sleep(60)
""")


@contextlib.contextmanager
def parent_and_child(child: str) -> Iterator[tuple[subprocess.Popen, psutil.Process]]:
    """A parent process (WORKER) and the child it starts running `child`; both ended afterwards."""
    parent = subprocess.Popen([sys.executable, "-c", f"ENGINE = {child!r}\n{WORKER}"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    process = psutil.Process(int(parent.stdout.readline()))
    try:
        yield parent, process
    finally:
        for leftover in (parent, process):
            with contextlib.suppress(psutil.Error, OSError):
                leftover.kill()
        parent.stdout.close()


def gone(process: psutil.Process) -> bool:
    return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def test_an_engine_stops_within_seconds_when_its_worker_is_killed():
    with parent_and_child(ENGINE) as (worker, engine):
        worker.kill()  # SIGKILL: nothing of the worker's own cleanup runs
        worker.wait()
        assert poll(lambda: gone(engine), bool, within_s=10), "the engine outlived its worker"


# An "EngineCore" that starts an executor "worker" deaf to SIGTERM (as run_executor_worker does).
DEAF_WORKER = textwrap.dedent("""
    import time
    from services.gpu.engine_watch import deaf_to_sigterm_while_parent_lives
    deaf_to_sigterm_while_parent_lives(every_s=0.05)
    time.sleep(60)
""")


def test_an_executor_worker_deaf_to_sigterm_still_goes_with_its_engine_core():
    with parent_and_child(DEAF_WORKER) as (core, worker):
        assert poll(lambda: _blocked(worker.pid) & (1 << (signal.SIGTERM - 1)), bool,
                    within_s=10), "SIGTERM is not blocked"
        worker.send_signal(signal.SIGTERM)
        assert not poll(lambda: gone(worker), bool, within_s=0.5), "SIGTERM ended a deaf worker"
        core.kill()  # the EngineCore dies without a word
        core.wait()
        assert poll(lambda: gone(worker), bool, within_s=10), "the executor worker outlived its EngineCore"


def _blocked(pid: int) -> int:
    """The signal mask a process blocks (SigBlk in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    return 0


def test_vllm_starts_the_engine_core_through_the_watch_pickled_by_reference():
    """A spawned process unpickles its target by name: inside the block that name is ours, and it
    is vLLM's own again afterwards."""
    from vllm.v1.engine.core import EngineCoreProc

    original = EngineCoreProc.run_engine_core
    with engine_watch.launching_watched_engines():
        target = EngineCoreProc.run_engine_core
        assert target is engine_watch.run_watched_engine_core
        assert pickle.loads(pickle.dumps(target)) is engine_watch.run_watched_engine_core
        assert os.environ[engine_watch.PARENT_ENV] == str(os.getpid())
    assert EngineCoreProc.run_engine_core is original
    assert engine_watch.PARENT_ENV not in os.environ


class DeadClient:
    errored = False


def test_a_worker_exits_once_its_engine_client_is_dead(monkeypatch):
    monkeypatch.setattr(engine_watch, "WORKER_EXIT_GRACE_S", 0)
    client, exited = DeadClient(), threading.Event()
    engine_watch.exit_when_engine_dies(client, every_s=0.01, exit=lambda code: exited.set())
    assert not exited.wait(0.1), "exited while the engine was alive"
    client.errored = True
    assert exited.wait(5), "a worker with a dead engine stayed up"


def test_an_engine_that_stops_with_the_replica_is_logged_as_the_stop_and_the_worker_still_exits(monkeypatch, caplog):
    from services.gpu import draining

    monkeypatch.setattr(engine_watch, "WORKER_EXIT_GRACE_S", 0)
    stopping = threading.Event()
    monkeypatch.setattr(draining, "_told_to_stop", stopping)
    for told, level in ((True, logging.INFO), (False, logging.ERROR)):
        stopping.set() if told else stopping.clear()
        client, exited = DeadClient(), threading.Event()
        client.errored = True
        with caplog.at_level(logging.INFO, logger="bentoml.service.llm"):
            caplog.clear()
            engine_watch.exit_when_engine_dies(client, every_s=0.01, exit=lambda code: exited.set())
            assert exited.wait(5), "a worker with a dead engine stayed up"
        said = [r for r in caplog.records if "engine" in r.getMessage()]
        assert [r.levelno for r in said] == [level], [(r.levelname, r.getMessage()) for r in said]


def test_vllms_engine_dead_traceback_is_one_info_line_while_the_replica_stops(monkeypatch):
    from vllm.v1.engine.exceptions import EngineDeadError

    from services.gpu import draining

    stopping = threading.Event()
    monkeypatch.setattr(draining, "_told_to_stop", stopping)

    def record() -> logging.LogRecord:
        try:
            raise EngineDeadError()
        except EngineDeadError:
            return logging.getLogger("vllm.v1.engine.async_llm").makeRecord(
                "vllm.v1.engine.async_llm", logging.ERROR, __file__, 1, "AsyncLLM output_handler failed.", None,
                sys.exc_info())

    quiet = engine_watch.EngineStopNotAFault()
    running = record()
    assert quiet.filter(running) and running.levelno == logging.ERROR and running.exc_info, "a fault stays a fault"
    stopping.set()
    stopped = record()
    assert quiet.filter(stopped)
    assert (stopped.levelno, stopped.exc_info) == (logging.INFO, None)
    assert stopped.getMessage() == "AsyncLLM output_handler failed. (the engine stopped with the replica)"
    engine_watch.quiet_engine_stop()
    engine_watch.quiet_engine_stop()
    filters = logging.getLogger("vllm.v1.engine.async_llm").filters
    assert sum(isinstance(f, engine_watch.EngineStopNotAFault) for f in filters) == 1


def test_a_restarted_engine_client_stops_the_engine_it_cannot_join_again(tmp_path: Path):
    """Worker 2 died and came back: the engine it joined will not greet it again, so it stops that
    engine (before it binds its sockets), and its client then waits for the next one worker 1
    starts, whatever engine.json still says."""
    slot = engine_clients.EngineClientSlot(run_dir=tmp_path, count=2, index=1)
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    new = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / engine_clients.ENGINE_FILE).write_text(json.dumps({"pid": old.pid}))
        (tmp_path / f"joined-{slot.index}").write_text(str(old.pid))
        assert engine_clients._leave_engine_joined_before(slot) == old.pid
        assert old.poll() is not None, "the engine it had joined is still running"
        assert engine_clients._leave_engine_joined_before(slot) is None  # engine.json names a dead engine
        (tmp_path / engine_clients.ENGINE_FILE).write_text(json.dumps({"pid": new.pid}))
        assert engine_clients._leave_engine_joined_before(slot) is None  # a new engine: it greets this client
        assert new.poll() is None
    finally:
        for process in (old, new):
            process.kill()
            process.wait()


def test_the_engines_executor_workers_start_deaf_to_sigterm(monkeypatch):
    """In the EngineCore's process vLLM starts its executor's workers through ours (by name), which
    blocks SIGTERM before vLLM's own code runs: circus's SIGTERM to every descendant no longer kills
    them while the EngineCore drains."""
    from vllm.v1.executor import multiproc_executor

    monkeypatch.setattr(multiproc_executor.WorkerProc, "worker_main", multiproc_executor.WorkerProc.worker_main)
    engine_watch._executor_workers_ignore_sigterm()
    target = multiproc_executor.WorkerProc.worker_main
    assert pickle.loads(pickle.dumps(target)) is engine_watch.run_executor_worker
    probe = textwrap.dedent("""
        import signal
        from vllm.v1.executor.multiproc_executor import WorkerProc
        WorkerProc.worker_main = staticmethod(lambda: print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))))
        from services.gpu.engine_watch import run_executor_worker
        run_executor_worker()
    """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, check=True)
    blocked = json.loads(done.stdout.strip().splitlines()[-1])
    assert {int(signal.SIGTERM), int(signal.SIGINT)} <= set(blocked)
