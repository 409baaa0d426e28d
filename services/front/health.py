"""Whether the GPU tier can take work now, known without waiting on it (`TierMonitor`).

The front polls LLMService's /readyz in the background and marks the tier down at once when a
call to it fails; while it is down, generation requests get a quick 503 with `Retry-After`, never
a long timeout. A check that fails for this process's own lack of sockets or memory changes
nothing (docs/architecture.md, "The front door").
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable

from services.errors import RequestError, TierUnavailable
from services.front.metrics import front_metrics

logger = logging.getLogger("bentoml.service.prompt")

# errnos that say this process ran out of something, not that the GPU tier is unwell
LOCAL_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})


def is_local_exhaustion(error: BaseException | None) -> bool:
    """True when a failed call failed on this side (out of file descriptors, buffers, ports)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in LOCAL_EXHAUSTION:
            return True
        error, seen = getattr(error, "os_error", None) or error.__cause__, seen + 1
    return False


class TierMonitor:
    def __init__(self, name: str, *, interval_s: float = 1.0, retry_after_s: int = 1,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.name = name
        # what a change of state is reported to: by default the front's one `pipeline_gpu_tier_ready`;
        # each replica's own monitor (services/front/routing/replica.py) reports its own series
        self.on_change = on_change or (lambda ready: front_metrics().gpu_tier_ready.set(1 if ready else 0))
        self.interval_s = interval_s
        self.retry_after_s = retry_after_s
        self.ready = False
        self.seen_ready = False  # this worker has seen the tier ready at least once
        self.reason = "not checked yet"
        self.since = time.monotonic()
        self._check: Callable[[], Awaitable[bool]] | None = None
        self._on_ready: Callable[[], Awaitable[None]] | None = None
        self._task: asyncio.Task | None = None
        self._confirming: asyncio.Future | None = None

    def watch(self, check: Callable[[], Awaitable[bool]], on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start polling `check` (a bounded readiness call) in the running event loop; `on_ready`
        runs each time the tier comes up, before it is marked ready."""
        self._check, self._on_ready = check, on_ready
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def mark_down(self, reason: str) -> None:
        """A call to the tier failed: refuse work until a check says it is ready again."""
        self._set(False, reason)

    def require(self) -> None:
        """Raise TierUnavailable (503) unless the tier is ready."""
        if not self.ready:
            down_for = time.monotonic() - self.since
            raise TierUnavailable(
                f"the GPU tier ({self.name}) is not available ({self.reason}, for {down_for:.0f} s); "
                f"try again in {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )

    async def confirm_at_start(self) -> None:
        """Before this worker refuses work on a tier it has never seen ready, check now (one check
        for all the requests that wait on it). A front whose other worker already answered its
        /readyz gets traffic within the poll interval of this worker's next check, and must not
        answer 503 then. Once the tier has been seen ready, an outage costs a quick 503 again."""
        if self.ready or self.seen_ready or self._check is None:
            return
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.ensure_future(self.check_now())
        await asyncio.shield(self._confirming)

    async def check_now(self) -> None:
        """One readiness check (the poll loop runs this every `interval_s`)."""
        try:
            ready = await self._check() if self._check else False
            if ready and not self.ready and self._on_ready is not None:
                await self._on_ready()
            self._set(ready, "ready" if ready else "its /readyz does not answer 200")
        except asyncio.CancelledError:
            raise
        except RequestError as error:
            self._set(False, error.message)
        except Exception as error:  # a check must never end the loop
            if is_local_exhaustion(error):
                logger.error("GPU tier check failed on this worker's side, state kept: %r", error)
            else:
                self._set(False, f"readiness check failed: {error!r}")

    async def _poll(self) -> None:
        while True:
            await self.check_now()
            await asyncio.sleep(self.interval_s)

    def _set(self, ready: bool, reason: str) -> None:
        if ready != self.ready:
            logger.warning("GPU tier %s is %s (%s)", self.name, "ready" if ready else "NOT ready", reason)
            self.since = time.monotonic()
            self.on_change(ready)  # on a change only: off the request path
        self.ready, self.reason = ready, reason
        self.seen_ready = self.seen_ready or ready
