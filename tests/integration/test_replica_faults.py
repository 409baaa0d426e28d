"""An LLMService replica (the per-tier `start-http-server`, the real engine) survives its own faults,
and one told to stop loses nothing.

- kill -9 of a worker (worker 1, which launched the engine, with one engine client; each kind with
  two): the engine it ran on goes within seconds (no EngineCore is left without its parent), and so
  does the KV indexer worker 1 started; the replica serves again;
- the harness's Server.stop leaves no process behind (after those restarts);
- SIGTERM: the replica turns not ready at once, refuses new work with 503, finishes the stream
  under way whole, then exits.

Each test starts its own replica (they kill or stop it) and stops it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil

from harness import ROOT, Server, poll, start_tier

LOGS = ROOT / ".cache" / "test-logs"
ORPHAN_DEADLINE_S = 15  # the engine of a dead worker is gone within this
RECOVERY_DEADLINE_S = 240  # the replica serves again within this (a new engine starts: ~30-60 s here)


def replica(name: str, clients: int) -> Server:
    log = LOGS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    return start_tier("LLMService", log=log, env={"PIPELINE_ENGINE_CLIENTS": str(clients)})


def body(request_id: str, max_tokens: int = 4) -> dict:
    return {"request": {"request_id": request_id, "token_ids": [504, 3575, 282, 4649, 314],
                        "sampling_params": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}}


def generate_status(server: Server, request_id: str) -> int | None:
    """/generate's status, or None when no answer came (no worker is up yet)."""
    try:
        with server.llm_tier(timeout_s=10) as llm:
            return llm.post("/generate", json=body(request_id)).status_code
    except httpx.HTTPError:
        return None


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kv_indexers(server: Server) -> list[psutil.Process]:
    """The replica's KV indexer processes (services/gpu/kv_indexer.py)."""
    found = []
    for process in server.tree():
        try:
            if "services.gpu.kv_indexer" in process.cmdline():
                found.append(process)
        except psutil.Error:
            continue
    return found


def check_survives_the_kill(server: Server, victim: psutil.Process, engine: psutil.Process) -> None:
    """`victim` killed: an engine it launched goes within seconds, and so does the KV indexer it
    started; then a request succeeds on a new engine, whose parent is one of the replica's workers."""
    launched_it = engine.parent() == victim
    indexers = kv_indexers(server)
    assert len(indexers) == 1 and (indexers[0].parent() == victim) == launched_it, "one indexer, worker 1's"
    victim.kill()
    if launched_it:
        assert poll(lambda: gone(engine), bool, within_s=ORPHAN_DEADLINE_S), \
            f"the EngineCore (pid {engine.pid}) outlived worker {victim.pid} by {ORPHAN_DEADLINE_S} s"
        assert poll(lambda: gone(indexers[0]), bool, within_s=ORPHAN_DEADLINE_S), \
            f"the KV indexer (pid {indexers[0].pid}) outlived worker {victim.pid} by {ORPHAN_DEADLINE_S} s"
    started = time.monotonic()

    def served_by_a_new_engine() -> bool:
        cores = server.engine_cores()
        return len(cores) == 1 and cores[0].pid != engine.pid and generate_status(server, f"after-{victim.pid}") == 200

    # (a kill of worker 2 leaves worker 1 serving on the old engine until worker 2 is back and stops it)
    assert poll(served_by_a_new_engine, bool, within_s=RECOVERY_DEADLINE_S, every_s=1), \
        f"no answer from a new engine {RECOVERY_DEADLINE_S} s after the kill; log:\n{server.log_tail()}"
    [core] = server.engine_cores()
    assert core.parent() in server.workers()["LLMService"]
    assert gone(engine), f"the old EngineCore (pid {engine.pid}) is still running"
    [indexer] = poll(lambda: kv_indexers(server), lambda found: len(found) == 1, within_s=30)
    assert indexer.parent() == core.parent(), "the new engine's worker runs the replica's one KV indexer"
    print(f"served by a new engine {time.monotonic() - started:.0f} s after the kill")


def test_one_engine_client_survives_a_kill_of_its_worker():
    server = replica("faults-1", clients=1)
    try:
        [worker] = server.workers()["LLMService"]
        [engine] = server.engine_cores()
        assert engine.parent() == worker
        check_survives_the_kill(server, worker, engine)
    finally:
        server.stop()


def test_two_engine_clients_survive_a_kill_of_either_worker_and_the_harness_stop_leaves_nothing_behind():
    server = replica("faults-2", clients=2)
    try:
        for kind in ("worker 1, which launched the engine", "worker 2"):
            [engine] = server.engine_cores()
            workers = server.workers()["LLMService"]
            assert len(workers) == 2 and engine.parent() in workers
            victim = engine.parent() if kind.startswith("worker 1") else next(w for w in workers if w != engine.parent())
            check_survives_the_kill(server, victim, engine)
            # every worker is an engine client of the new engine
            readiness = poll(server.engine_client_readiness, lambda seen: seen == {1: 200, 2: 200}, within_s=60)
            assert readiness == {1: 200, 2: 200}, f"after killing {kind}: {readiness}"
        # the replica's processes after two restarts: its workers, an engine, an indexer
        processes = server.tree()
        assert server.engine_cores() and kv_indexers(server)
    finally:
        server.stop()
    left = [p for p in processes if not gone(p)]
    assert not left, f"left running after stop: {[(p.pid, p.name()) for p in left]}"


def test_sigterm_finishes_the_stream_under_way_and_takes_no_new_work():
    """As Kubernetes scales a replica in: SIGTERM to the container's first process (circus)."""
    server = replica("drain", clients=2)
    try:
        frames: list[dict] = []
        first = threading.Event()
        failure: list[BaseException] = []

        def stream() -> None:
            try:
                with server.llm_tier(timeout_s=120) as llm:
                    with llm.stream("POST", "/generate", json=body("long-stream", max_tokens=160)) as response:
                        assert response.status_code == 200
                        for line in response.iter_lines():
                            if line.strip():
                                frames.append(json.loads(line))
                                first.set()
            except BaseException as error:  # noqa: BLE001 (reported below)
                failure.append(error)
                first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60) and not failure, failure
        os.kill(server.process.pid, signal.SIGTERM)
        with server.llm_tier(timeout_s=5) as llm:
            ready = poll(lambda: llm.get("/readyz").status_code, lambda code: code != 200, within_s=5)
            refused = llm.post("/generate", json=body("late")).status_code
        assert not frames or frames[-1].get("finish_reason") is None, "the stream ended before the checks: make it longer"
        reader.join(120)
        assert not failure, failure
        assert frames and frames[-1].get("finish_reason") == "length" and frames[-1]["completion_tokens"] == 160, \
            f"the stream under way ended with {frames[-1] if frames else None}"
        assert ready != 200, "still ready after SIGTERM"
        assert refused == 503, f"a new /generate after SIGTERM got {refused}"
        server.process.wait(60)
    finally:
        server.stop()
