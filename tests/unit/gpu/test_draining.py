"""SIGTERM drains a worker (services/gpu/draining.py): not ready at once, the work under way
finished, only then the server's own shutdown (uvicorn's handler, stood in for here)."""

from __future__ import annotations

import asyncio
import os
import signal

from services.gpu.draining import Drain


def test_sigterm_waits_for_the_work_under_way_then_hands_over():
    stopped: list[int] = []
    busy = [2]

    async def run() -> None:
        drain = Drain(lambda: busy[0], timeout_s=30, every_s=0.01)
        drain.install()
        os.kill(os.getpid(), signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not drain.draining and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert drain.draining, "not draining after SIGTERM"
        await asyncio.sleep(0.2)
        assert stopped == [], "the server stopped with work under way"
        busy[0] = 0
        while not stopped and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert stopped == [signal.SIGTERM], "the server's own shutdown never came"

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))  # uvicorn's, say
    try:
        asyncio.run(run())
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_drain_that_takes_too_long_stops_anyway_and_a_second_sigterm_at_once():
    stopped: list[int] = []

    async def run() -> None:
        drain = Drain(lambda: 1, timeout_s=0.1, every_s=0.01)
        drain.install()
        os.kill(os.getpid(), signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not stopped and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert stopped == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)  # draining already: straight through
        while len(stopped) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert stopped == [signal.SIGTERM, signal.SIGTERM]

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    try:
        asyncio.run(run())
    finally:
        signal.signal(signal.SIGTERM, previous)
