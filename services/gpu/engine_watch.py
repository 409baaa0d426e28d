"""The engine lives no longer than the worker that launched it, and a worker no longer than its engine.

vLLM's EngineCore is a plain child with no watch of its parent: a SIGKILLed worker left it running,
holding its memory. `launching_watched_engines()` starts it through `run_watched_engine_core`, which
stops the engine when its parent changes; `exit_when_engine_dies(client)` ends the worker once its
engine client is dead, so it starts again on a new engine (docs/architecture.md, "Faults").
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from services.gpu.draining import told_to_stop

logger = logging.getLogger("bentoml.service.llm")

PARENT_ENV = "PIPELINE_ENGINE_PARENT_PID"
WATCH_EVERY_S = 0.25
ENGINE_EXIT_GRACE_S = 5.0
# How long a worker whose engine died lets its streams send their error before it exits.
WORKER_EXIT_GRACE_S = 1.0


def run_watched_engine_core(*args, **kwargs):
    """vLLM's `EngineCoreProc.run_engine_core`, with a watch of the parent process first, and its
    executor's worker processes deaf to SIGTERM (`run_executor_worker`)."""
    from vllm.v1.engine.core import EngineCoreProc

    parent = int(os.environ.get(PARENT_ENV) or os.getppid())
    watch_parent(parent)
    _executor_workers_ignore_sigterm()
    return EngineCoreProc.run_engine_core(*args, **kwargs)


def _executor_workers_ignore_sigterm() -> None:
    """When a replica is told to stop, circus sends SIGTERM to every descendant of each worker
    (`stop_children`), and vLLM's executor worker processes (VLLM::Worker: the CPU engine's, a
    GPU engine's with tensor parallelism) die of it at once, failing the requests the EngineCore
    is draining. Their EngineCore ends them anyway (it closes their death pipe, or they see it
    exit), so here they start through `run_executor_worker`, which blocks SIGTERM and SIGINT.
    Only in this (the EngineCore's) process."""
    try:
        from vllm.v1.executor.multiproc_executor import WorkerProc
    except ImportError:
        return
    WorkerProc.worker_main = staticmethod(run_executor_worker)  # this process only: it starts them by name


def run_executor_worker(*args, **kwargs):
    """vLLM's `WorkerProc.worker_main`, deaf to SIGTERM and SIGINT until its EngineCore is gone."""
    from vllm.v1.executor.multiproc_executor import WorkerProc

    deaf_to_sigterm_while_parent_lives()
    return WorkerProc.worker_main(*args, **kwargs)


def deaf_to_sigterm_while_parent_lives(every_s: float = WATCH_EVERY_S) -> threading.Thread:
    """Block SIGTERM and SIGINT in this process (pending, never delivered: vLLM's own handler, set
    later, does not change that), and exit at once when the parent (the EngineCore) is gone.

    vLLM's death pipe alone does not end such a worker: it shuts the worker's queues down, and a
    worker that was not in its busy loop then (seen here: one still starting when its EngineCore
    was killed) waited on forever, deaf to the SIGTERM that would have ended it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    # INFO: the EngineCore's end, a stop or a fault, is told by the engine clients
    return watch_parent(os.getppid(), every_s, on_gone=lambda: os._exit(1),
                        said=(logging.INFO, "its EngineCore (pid %d) is gone; this executor worker exits"))


def watch_parent(parent: int, every_s: float = WATCH_EVERY_S, on_gone: Callable[[], None] | None = None,
                 said: tuple[int, str] = (logging.ERROR, "the worker that launched this engine (pid %d) is gone; "
                                                         "the engine stops")) -> threading.Thread:
    """A daemon thread that ends this process once `parent` is no longer its parent, saying so
    (`said`: a level, and a message with the parent's pid)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        level, message = said
        logger.log(level, message, parent)
        (on_gone or _stop_this_process)()

    thread = threading.Thread(target=watch, daemon=True, name="ParentWatch")
    thread.start()
    return thread


def _stop_this_process() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # vLLM's handler: the busy loop ends, the executor stops
    time.sleep(ENGINE_EXIT_GRACE_S)
    os._exit(1)


@contextlib.contextmanager
def launching_watched_engines() -> Iterator[None]:
    """Engines launched inside this block watch this process (see the module docstring)."""
    from vllm.v1.engine.core import EngineCoreProc

    original = EngineCoreProc.__dict__["run_engine_core"]
    os.environ[PARENT_ENV] = str(os.getpid())  # a spawned process starts with this environment
    EngineCoreProc.run_engine_core = staticmethod(run_watched_engine_core)
    try:
        yield
    finally:
        EngineCoreProc.run_engine_core = original
        os.environ.pop(PARENT_ENV, None)


def exit_when_engine_dies(client, every_s: float = WATCH_EVERY_S, exit: Callable[[int], None] = os._exit) -> threading.Thread:
    """A daemon thread that ends this worker once its engine client is dead (`errored`). While the
    replica stops (SIGTERM), that is the engine's own stop: said at INFO, not as a fault."""

    def watch() -> None:
        while not client.errored:
            time.sleep(every_s)
        if told_to_stop():
            logger.info("the engine stopped with the replica; this worker exits")
        else:
            logger.error("the engine is gone; this worker exits so that it starts again with a new engine")
        time.sleep(WORKER_EXIT_GRACE_S)
        if _workers_are_not_restarted():
            logger.error("in a container circus restarts no worker: stopping the server (pid %d)", os.getppid())
            os.kill(os.getppid(), signal.SIGTERM)
        exit(1)

    thread = threading.Thread(target=watch, daemon=True, name="EngineWatch")
    thread.start()
    return thread


def _workers_are_not_restarted() -> bool:
    """BentoML's own test for giving its workers `respawn=False` (bentoml/serving.py)."""
    from bentoml.serving import running_inside_container

    return running_inside_container()


class EngineStopNotAFault(logging.Filter):
    """vLLM's engine client logs the EngineDeadError of its output handler at ERROR, with a
    traceback. While the replica stops, that is the EngineCore having stopped first (circus
    signals it with the workers): the record becomes one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if told_to_stop() and type(error).__name__ == "EngineDeadError":
            record.msg, record.args = f"{record.getMessage()} (the engine stopped with the replica)", None
            record.levelno, record.levelname, record.exc_info, record.exc_text = logging.INFO, "INFO", None, None
        return True


def quiet_engine_stop() -> None:
    """Log an EngineCore's exit during the replica's stop as the stop it is (EngineStopNotAFault)."""
    engine_client_log = logging.getLogger("vllm.v1.engine.async_llm")
    if not any(isinstance(f, EngineStopNotAFault) for f in engine_client_log.filters):
        engine_client_log.addFilter(EngineStopNotAFault())
