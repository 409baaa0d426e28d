"""The whole engine's load as its scheduler last reported it: running, waiting, KV usage.

The EngineCore sends its stats with each step to one engine client only, so each worker records
what it receives (`SchedulerStatsRecorder`, a vLLM stat logger) in its slot of a shared file in the
run directory; the newest slot is the engine's state (`EngineStats.latest`).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

from services.protocol import ReplicaLoad

SLOT = struct.Struct("dqqd")  # monotonic time, running, waiting, kv usage
FILE = "scheduler-stats"


class EngineStats:
    """The replica's shared board of scheduler stats, one slot per engine client."""

    def __init__(self, run_dir: Path, count: int, index: int) -> None:
        self.count, self.index = count, index
        with open(run_dir / FILE, "a+b") as file:  # every worker sizes it; the first one zero-fills it
            if os.fstat(file.fileno()).st_size < SLOT.size * count:
                file.truncate(SLOT.size * count)
            self.board = mmap.mmap(file.fileno(), SLOT.size * count)

    def record(self, running: int, waiting: int, kv_usage: float) -> None:
        SLOT.pack_into(self.board, SLOT.size * self.index, time.monotonic(), running, waiting, kv_usage)

    def latest(self) -> ReplicaLoad:
        slots = [SLOT.unpack_from(self.board, SLOT.size * i) for i in range(self.count)]
        _, running, waiting, kv_usage = max(slots)
        return ReplicaLoad(running=max(running, 0), waiting=max(waiting, 0), kv_usage=min(max(kv_usage, 0.0), 1.0))

    def stat_logger(self):
        """A vLLM stat logger factory that records into this board."""
        return lambda vllm_config, engine_index=0: _recorder_class()(self)


_RECORDER = None


def _recorder_class():
    """vLLM's StatLoggerBase subclass, made once vLLM is imported (in the worker)."""
    global _RECORDER
    if _RECORDER is None:
        from vllm.v1.metrics.loggers import StatLoggerBase

        class SchedulerStatsRecorder(StatLoggerBase):
            def __init__(self, stats: EngineStats) -> None:
                self.stats = stats

            def record(self, scheduler_stats, iteration_stats=None, *args, **kwargs) -> None:
                if scheduler_stats is not None:
                    self.stats.record(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                                      scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self) -> None:
                pass

        _RECORDER = SchedulerStatsRecorder
    return _RECORDER
