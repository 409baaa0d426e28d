"""A replica told to stop finishes what it started (`Drain`, on SIGTERM).

SIGTERM turns the worker not ready at once and refuses new work with 503, while the streams under
way run to their end; then it stops (after `PIPELINE_DRAIN_TIMEOUT_S` at the latest; a second
SIGTERM stops at once). Worker 1 waits for the whole engine's requests, the others for their own.
Why not uvicorn's own handler: docs/architecture.md, "Scaling in". `told_to_stop()` says whether
this process has had its SIGTERM: its engine exiting then is the stop, logged as such, not a fault.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger("bentoml.service.llm")

_told_to_stop = threading.Event()


def told_to_stop() -> bool:
    """Whether this process has had its SIGTERM (circus sends it to the EngineCore too)."""
    return _told_to_stop.is_set()


class Drain:
    def __init__(self, busy: Callable[[], int], timeout_s: float, every_s: float = 0.1) -> None:
        self.busy = busy  # requests this worker must see finish before it stops
        self.timeout_s = timeout_s
        self.every_s = every_s
        self.draining = False
        self._previous = None

    def install(self) -> None:
        """Take over SIGTERM in this (the event loop's) thread, after uvicorn has set its own."""
        loop = asyncio.get_running_loop()
        self._previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame) -> None:
            _told_to_stop.set()
            if self.draining:  # a second one: stop now
                self._stop(signum, frame)
                return
            self.draining = True
            logger.info("SIGTERM: not ready; finishing %d requests under way, taking no new ones", self.busy())
            loop.call_soon_threadsafe(lambda: loop.create_task(self._finish(signum)))

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: leave uvicorn's handler (no drain) rather than fail the start
            logger.warning("drain: SIGTERM can only be taken over in the main thread; a stop will not drain")

    async def _finish(self, signum: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while self.busy() > 0 and loop.time() < deadline:
            await asyncio.sleep(self.every_s)
        if self.busy() > 0:
            logger.warning("drain: %d requests still under way after %.0f s; stopping", self.busy(), self.timeout_s)
        else:
            logger.info("drain: every request finished; stopping")
        self._stop(signum, None)

    def _stop(self, signum: int, frame) -> None:
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        else:  # no handler before ours: the default, which ends the process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
