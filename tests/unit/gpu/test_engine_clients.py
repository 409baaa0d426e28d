"""services/gpu/engine_clients.py without an engine: the sockets each engine client binds, the run
directory the workers share, the engine's load summed over the workers, how the engine process
starts, and the start itself (every client built while the engine starts, with vLLM's own engine
client waiting for a ready message, and how a failed start ends every wait)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import ROOT, parse_cpus, parse_target
from services.config import Settings
from services.gpu import engine_args, engine_clients
from services.gpu.engine_clients import (
    ENGINE_FILE,
    EngineClientSlot,
    EngineLoad,
    EngineStartError,
    ReadyWait,
    _engine_joined_before,
    _engine_that_greeted,
    _start_failure,
    begin_epoch,
    engine_epoch,
    launch_and_connect,
)


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
    # and the prompt tokens not yet prefilled, the same way
    workers[0].add(+1, prefill_tokens=300)
    workers[2].add(+1, prefill_tokens=1000)
    assert [w.prefill_tokens() for w in workers] == [1300, 1300, 1300]
    workers[2].add(0, prefill_tokens=-1000)  # its first output
    assert workers[1].prefill_tokens() == 300 and workers[1].total() == 4


def test_each_engine_gets_a_new_epoch_which_every_worker_reads(tmp_path: Path):
    first = begin_epoch(tmp_path)
    assert engine_epoch(tmp_path) == first
    second = begin_epoch(tmp_path)  # the next engine (worker 1 started again)
    assert second != first and engine_epoch(tmp_path) == second


def test_one_engine_client_counts_its_own_requests():
    alone = EngineLoad(None)
    for _ in range(3):
        alone.add(+1)
    assert alone.total() == 3


@pytest.mark.parametrize("target, parsed", [("vllm", ("vllm", None)), ("vllm-api8", ("vllm", 8)),
                                            ("pipeline", ("pipeline", None)), ("pipeline-ec4", ("pipeline", 4)),
                                            ("pipeline-ec8-keepalive-kvevents", ("pipeline", 8))])
def test_benchmark_targets(target, parsed):
    assert parse_target(target) == parsed


@pytest.mark.parametrize("target", ["vllm-ec2", "pipeline-api2", "pipeline-ec0", "sglang", "vllm-api8-keepalive",
                                    "pipeline-ec8-kvevents-keepalive"])
def test_unknown_benchmark_targets_are_refused(target):
    with pytest.raises(ValueError):
        parse_target(target)


def test_cpu_lists_read_as_taskset_does():
    assert parse_cpus("0-1,4") == {0, 1, 4} and parse_cpus("3") == {3}


def test_pinning_moves_every_thread_of_a_process():
    import threading

    import psutil

    from harness import pin

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


# --- the start: every engine client while the engine starts ----------------------------------------
# vLLM's own engine client (`AsyncMPClient`: binds its sockets, waits for the engine's ready message)
# on a default configuration, with no engine: the waits below are vLLM's, not a copy of them.


@pytest.fixture
def run_dir():
    """A short run directory (a Unix socket's path has at most 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="ec-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def vllm_client(monkeypatch):
    """`build(slot)`: a function that makes vLLM's engine client for that slot, whose wait for the
    ready message is vLLM's own (its limit set to 60 s: a test that waits that long has failed)."""
    from vllm.config import VllmConfig
    from vllm.v1.engine import core_client

    monkeypatch.setattr(core_client, "VLLM_ENGINE_READY_TIMEOUT_S", 60)
    built = []

    def build(slot: EngineClientSlot):
        def make():
            client = core_client.AsyncMPClient(vllm_config=VllmConfig(), executor_class=None, log_stats=False,
                                               client_addresses=slot.addresses(slot.index))
            built.append(client)
            return client

        return make

    yield build
    for client in built:
        client.shutdown()


def greet(slot: EngineClientSlot, after_s: float = 0.0) -> None:
    """What an EngineCore that is up does: send the client's input socket its ready message."""
    import zmq

    time.sleep(after_s)
    with zmq.Context() as context, context.socket(zmq.DEALER) as socket:
        socket.setsockopt(zmq.IDENTITY, (0).to_bytes(2, "little"))  # data-parallel rank 0
        socket.setsockopt(zmq.LINGER, 2000)
        socket.connect(slot.addresses(slot.index)["input_address"])
        socket.send(b"")  # a ready message without the engine's cache figures


class FakeManager:
    """An engine's process manager: its pid is this process's."""

    def __init__(self) -> None:
        self.processes = [SimpleNamespace(pid=os.getpid())]
        self.stopped = threading.Event()

    def shutdown(self, timeout=None) -> None:
        self.stopped.set()


def no_launch_thread_left() -> bool:
    return not any(thread.name == "EngineLaunch" and thread.is_alive() for thread in threading.enumerate())


def test_an_abort_ends_vllms_wait_for_the_ready_message_at_once(run_dir: Path, vllm_client):
    slot = EngineClientSlot(run_dir, 2, 1)
    wait = ReadyWait(slot.addresses(1)["input_address"])
    threading.Timer(0.5, wait.abort, args=("the engine could not start",)).start()
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="the engine could not start"):
        wait.connect(vllm_client(slot))
    assert time.monotonic() - started < 10


def test_an_abort_before_the_client_binds_its_socket_still_ends_its_wait(run_dir: Path, vllm_client):
    """Also over a socket file left by an earlier worker (nobody listening on it)."""
    slot = EngineClientSlot(run_dir, 2, 1)
    import socket as unix

    stale = unix.socket(unix.AF_UNIX)
    stale.bind(str(run_dir / "in-1"))
    stale.close()
    wait = ReadyWait(slot.addresses(1)["input_address"])
    wait.abort("worker 1 could not start the engine: boom")
    time.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="boom"):
        wait.connect(vllm_client(slot))
    assert time.monotonic() - started < 10


def test_the_ready_message_makes_the_client_and_a_later_abort_changes_nothing(run_dir: Path, vllm_client):
    slot = EngineClientSlot(run_dir, 2, 1)
    threading.Thread(target=greet, args=(slot, 0.3)).start()
    wait = ReadyWait(slot.addresses(1)["input_address"])
    client = wait.connect(vllm_client(slot))
    wait.abort("too late")
    assert client.resources.engine_dead is False and wait.reason is None


def test_the_longest_ready_wait_is_one_vllms_client_can_take(run_dir: Path, vllm_client):
    """Worker 1's client waits as long as the launch; vLLM polls with that limit in milliseconds,
    which ZMQ takes as a C int (OverflowError past about 24 days)."""
    from vllm.v1.engine import core_client

    engine_clients._wait_for_ready_at_least(10**9)
    assert core_client.VLLM_ENGINE_READY_TIMEOUT_S == engine_clients.LONGEST_READY_WAIT_S
    slot = EngineClientSlot(run_dir, 2, 0)
    threading.Thread(target=greet, args=(slot, 0.3)).start()
    assert ReadyWait(slot.addresses(0)["input_address"]).connect(vllm_client(slot)) is not None
    engine_clients._wait_for_ready_at_least(30)  # never shortens it
    assert core_client.VLLM_ENGINE_READY_TIMEOUT_S == engine_clients.LONGEST_READY_WAIT_S


def test_a_worker_that_waits_for_the_engine_fails_at_once_with_worker_1s_reason(run_dir: Path, vllm_client):
    """Workers 2..N build their clients while worker 1 starts the engine; when worker 1 writes
    the error in engine.json, they fail within a moment (not after vLLM's ready timeout)."""
    slot = EngineClientSlot(run_dir, 2, 1)
    engine_file = run_dir / ENGINE_FILE
    engine_file.write_text(json.dumps({"pid": 999999999}))  # an old engine's, gone: not a reason to stop
    check = _start_failure(engine_file, timeout_s=600)
    assert check() is None
    threading.Timer(1.0, engine_file.write_text, args=('{"error": "ValueError: out of GPU memory"}',)).start()
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="worker 1 could not start the engine: ValueError: out of GPU memory"):
        ReadyWait(slot.addresses(1)["input_address"], check=check, every_s=0.1).connect(vllm_client(slot))
    assert 1.0 <= time.monotonic() - started < 10


def test_a_worker_waits_for_the_engine_no_longer_than_the_start_timeout(run_dir: Path, vllm_client):
    slot = EngineClientSlot(run_dir, 2, 1)
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="worker 1 did not start the engine within 1 s"):
        ReadyWait(slot.addresses(1)["input_address"], check=_start_failure(run_dir / ENGINE_FILE, timeout_s=1),
                  every_s=0.1).connect(vllm_client(slot))
    assert time.monotonic() - started < 10


def test_what_a_restarted_worker_finds_in_the_run_directory(run_dir: Path):
    """It stops the engine engine.json names only when that engine is alive and is the one this
    client index joined before (it greets each client once); anything else is left as it is."""
    slot = EngineClientSlot(run_dir, 3, 2)
    engine_file, joined = run_dir / ENGINE_FILE, run_dir / "joined-2"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = os.getpid()

    def finds(engine: dict | str | None, joined_pid: int | None) -> int | None:
        engine_file.unlink(missing_ok=True)
        joined.unlink(missing_ok=True)
        if engine is not None:
            engine_file.write_text(engine if isinstance(engine, str) else json.dumps(engine))
        if joined_pid is not None:
            joined.write_text(str(joined_pid))
        return _engine_joined_before(slot)

    assert finds(None, None) is None  # a first start: worker 1 is launching
    assert finds(None, live) is None
    assert finds({"pid": live}, None) is None  # an engine this index has not joined: it greets it
    assert finds({"pid": live}, 12345) is None  # joined an older engine
    assert finds({"pid": gone.pid}, gone.pid) is None  # the engine it joined has exited: worker 1 launches anew
    assert finds({"error": "boom"}, live) is None
    assert finds('{"pi', live) is None  # being written
    assert finds({"pid": live}, live) == live  # restarted alone: this engine must go


def test_after_the_ready_message_a_worker_learns_which_engine_greeted_it(run_dir: Path):
    engine_file = run_dir / ENGINE_FILE
    threading.Timer(0.3, engine_file.write_text, args=(json.dumps({"pid": os.getpid()}),)).start()
    assert _engine_that_greeted(engine_file, within_s=10) == os.getpid()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    engine_file.write_text(json.dumps({"pid": gone.pid}))
    with pytest.raises(EngineStartError, match=f"pid {gone.pid}\\) exited"):
        _engine_that_greeted(engine_file, within_s=10)
    engine_file.write_text('{"error": "RuntimeError: engine core initialization failed"}')
    with pytest.raises(EngineStartError, match="could not start the engine: RuntimeError"):
        _engine_that_greeted(engine_file, within_s=10)
    engine_file.unlink()
    with pytest.raises(EngineStartError, match="named no engine"):
        _engine_that_greeted(engine_file, within_s=0.3)


def test_worker_1_builds_its_client_while_the_engine_starts(run_dir: Path, vllm_client):
    slot = EngineClientSlot(run_dir, 2, 0)
    engine_file = run_dir / ENGINE_FILE
    engine_file.write_text(json.dumps({"pid": 999999999}))  # the last engine's
    seen: dict[str, float] = {}

    def launch(spawned):
        spawned(FakeManager())
        time.sleep(1.5)  # the engine initialises
        seen["engine_up"] = time.monotonic()
        threading.Thread(target=greet, args=(slot,)).start()
        return FakeManager()

    build = vllm_client(slot)

    def build_and_note():
        seen["client_started"] = time.monotonic()
        return build()

    client, manager = launch_and_connect(engine_file, slot.addresses(0)["input_address"], launch, build_and_note, 60)
    assert seen["client_started"] < seen["engine_up"] - 1, "the client was built only after the engine was up"
    assert json.loads(engine_file.read_text()) == {"pid": os.getpid()}
    assert client is not None and not manager.stopped.is_set() and no_launch_thread_left()


def test_a_launch_that_fails_fails_worker_1_with_its_reason_and_leaves_nothing_waiting(run_dir: Path, vllm_client):
    slot = EngineClientSlot(run_dir, 2, 0)
    engine_file = run_dir / ENGINE_FILE

    def launch(spawned):
        spawned(FakeManager())
        time.sleep(1.0)
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        launch_and_connect(engine_file, slot.addresses(0)["input_address"], launch, vllm_client(slot), 60)
    assert time.monotonic() - started < 10
    assert json.loads(engine_file.read_text()) == {"error": "RuntimeError: Engine core initialization failed. See root cause above."}
    assert no_launch_thread_left()


def test_a_launch_that_fails_before_the_engine_process_starts_builds_no_client(run_dir: Path, monkeypatch):
    """...and leaves no ZMQ context open (the abort's, whose message nobody reads: an open one made
    a later garbage collection wait for ever)."""
    waits = []

    class NotedWait(ReadyWait):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            waits.append(self)

    monkeypatch.setattr(engine_clients, "ReadyWait", NotedWait)

    def launch(spawned):
        raise ValueError("bad engine arguments")

    def build():
        raise AssertionError("no client without an engine process")

    with pytest.raises(ValueError, match="bad engine arguments"):
        launch_and_connect(run_dir / ENGINE_FILE, f"ipc://{run_dir}/in-0", launch, build, 60)
    assert json.loads((run_dir / ENGINE_FILE).read_text()) == {"error": "ValueError: bad engine arguments"}
    [wait] = waits
    assert wait.reason and wait._context.closed


def test_a_client_that_fails_stops_the_engine_launch_under_way(run_dir: Path):
    manager = FakeManager()

    def launch(spawned):
        spawned(manager)
        if not manager.stopped.wait(60):  # vLLM's handshake wait ends when the engine process exits
            return manager
        raise RuntimeError("Engine core initialization failed. Failed core proc(s): {'EngineCore': -15}")

    def build():
        raise OSError("no tokenizer here")

    with pytest.raises(OSError, match="no tokenizer here"):
        launch_and_connect(run_dir / ENGINE_FILE, f"ipc://{run_dir}/in-0", launch, build, 60)
    assert manager.stopped.is_set() and no_launch_thread_left()
    assert json.loads((run_dir / ENGINE_FILE).read_text()) == {"error": "worker 1's engine client failed: OSError: no tokenizer here"}


def test_an_engine_that_never_greets_worker_1_fails_it_after_vllms_ready_timeout(run_dir: Path, vllm_client):
    slot = EngineClientSlot(run_dir, 2, 0)
    manager = FakeManager()

    def launch(spawned):
        spawned(manager)
        return manager  # up at once, but no ready message comes

    with pytest.raises(EngineStartError, match="sent no ready message within 1 s"):
        launch_and_connect(run_dir / ENGINE_FILE, slot.addresses(0)["input_address"], launch, vllm_client(slot), 1)
    assert manager.stopped.is_set() and no_launch_thread_left()
    assert "no ready message" in json.loads((run_dir / ENGINE_FILE).read_text())["error"]


def test_the_engine_starts_as_a_fresh_interpreter_as_vllm_serve_starts_it(tmp_path: Path, monkeypatch):
    """LLMService's engine arguments come with vLLM's start method set to spawn, unless set outside."""
    monkeypatch.setattr(engine_args, "is_cpu_build", lambda: False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    engine_args.engine_args(Settings(model=str(tmp_path)))
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    engine_args.engine_args(Settings(model=str(tmp_path)))
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
