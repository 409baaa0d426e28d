"""A server's start-up, broken down from its log (vLLM 0.26-0.32 and BentoML 1.4 messages).

`phases(log_text, started_at)`: seconds from the start to the lines that mark each step (their own
timestamps, whole seconds) and vLLM's own durations. `follow(path)` notes when each line reaches the
log (sub-second), `watch_processes(pid)` when each process of the tree was created; from those,
`client_phases` gives the engine clients' lag behind the engine and `breakdown` the same phases for
LLMService and `vllm serve`: launcher, imports and config, EngineCore imports, its init, to ready.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

BENTOML_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4})")
VLLM_TIME = re.compile(r"(?:INFO|WARNING|DEBUG|ERROR) (\d\d-\d\d \d\d:\d\d:\d\d)")

# name -> (pattern, which occurrence)
MILESTONES = {
    "api_processes_started": (r"Started \d+ API server processes", "first"),
    "engine_core_start": (r"Initializing a V1 LLM engine", "first"),
    "weights_loaded": (r"Model loading took", "first"),
    "compile_done": (r"torch\.compile took", "first"),
    "graphs_done": (r"Graph capturing finished", "first"),
    "engine_ready": (r"init engine \(profile, create kv cache, warmup model\) took", "first"),
    "clients_ready": (r"engine ready: model=|Application startup complete", "last"),
}
DURATIONS = {
    "weights_s": r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) seconds",
    "dynamo_s": r"Dynamo bytecode transform time: ([\d.]+) s",
    "inductor_s": r"Compiling a graph for compile range .* takes ([\d.]+) s",
    "compile_load_s": r"Directly load the compiled graph\(s\) .* took ([\d.]+) s",
    "torch_compile_s": r"torch\.compile took ([\d.]+) s in total",
    "cuda_graphs_s": r"Graph capturing finished in ([\d.]+) secs",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
}


def line_time(line: str, year: int) -> float | None:
    if match := BENTOML_TIME.search(line):
        return datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    if match := VLLM_TIME.search(line):
        return datetime.strptime(f"{year}-{match[1]}", "%Y-%m-%d %H:%M:%S").timestamp()  # local time
    return None


def phases(log_text: str, started_at: float) -> dict[str, float]:
    year = datetime.fromtimestamp(started_at).year
    found: dict[str, float] = {}
    first_line = None
    for line in log_text.splitlines():
        stamp = line_time(line, year)
        if stamp is not None and first_line is None:
            first_line = stamp
        for name, (pattern, which) in MILESTONES.items():
            if stamp is not None and re.search(pattern, line) and (which == "last" or name not in found):
                found[name] = round(stamp - started_at, 1)
        for name, pattern in DURATIONS.items():
            if name not in found and (match := re.search(pattern, line)):
                found[name] = float(match[1])
    if first_line is not None:
        found["first_log_line"] = round(first_line - started_at, 1)
    return found


CLIENT_CONNECTED = re.compile(r"engine client (\d+) of \d+ connected")


@contextlib.contextmanager
def follow(path: Path, every_s: float = 0.02) -> Iterator[list[tuple[float, str]]]:
    """(time.time() it was read, line) for each line written to `path` while inside the block."""
    arrivals: list[tuple[float, str]] = []
    stop = threading.Event()

    def read() -> None:
        pending = b""
        with path.open("rb") as log:
            while True:
                stopping = stop.is_set()
                chunk = log.read()
                now = time.time()
                *lines, pending = (pending + chunk).split(b"\n")
                arrivals.extend((now, line.decode(errors="replace")) for line in lines)
                if stopping:
                    return
                stop.wait(every_s)

    thread = threading.Thread(target=read, daemon=True, name="LogFollower")
    thread.start()
    try:
        yield arrivals
    finally:
        stop.set()
        thread.join(5)


def client_phases(arrivals: list[tuple[float, str]], started_at: float) -> dict:
    """From the lines' arrival times (`follow`): seconds from the start to the EngineCore's init
    line, to its "init engine ... took" line (the engine is up: it answers the launch's handshake
    and greets the clients next), and to each engine client's connected line; and each client's
    lag behind that engine-up line."""
    found: dict = {}
    connected: dict[str, float] = {}
    for stamp, line in arrivals:
        for name in ("engine_core_start", "engine_ready"):
            if name not in found and re.search(MILESTONES[name][0], line):
                found[name] = round(stamp - started_at, 2)
        if match := CLIENT_CONNECTED.search(line):
            connected[match[1]] = round(stamp - started_at, 2)
    found["clients_connected"] = dict(sorted(connected.items()))
    if connected:
        found["all_clients_connected"] = max(connected.values())
    if "engine_ready" in found:
        found["clients_after_engine_s"] = {n: round(at - found["engine_ready"], 2) for n, at in found["clients_connected"].items()}
    return found


@contextlib.contextmanager
def watch_processes(root_pid: int, every_s: float = 0.05) -> Iterator[dict[int, dict]]:
    """pid -> {ppid, created (time.time()), cmdline} for every process of `root_pid`'s tree seen
    while inside the block (polled; a process living under `every_s` may be missed)."""
    import psutil

    seen: dict[int, dict] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                root = psutil.Process(root_pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for process in tree:
                if process.pid in seen:
                    continue
                try:
                    seen[process.pid] = {"ppid": process.ppid(), "created": process.create_time(),
                                         "cmdline": " ".join(process.cmdline())[:300]}
                except psutil.Error:
                    pass
            stop.wait(every_s)

    thread = threading.Thread(target=poll, daemon=True, name="ProcessWatcher")
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)


def engine_spawn(processes: dict[int, dict], started_at: float) -> dict[str, float]:
    """When the EngineCore's process was created, and when the process that spawned it was: the
    first `multiprocessing.spawn` child in the tree is the EngineCore (vLLM starts it before its
    own workers and API processes). Seconds from `started_at`."""
    spawned = sorted((info["created"], pid) for pid, info in processes.items()
                     if "spawn_main" in info["cmdline"] and "resource_tracker" not in info["cmdline"])
    if not spawned:
        return {}
    created, pid = spawned[0]
    parent = processes.get(processes[pid]["ppid"])
    found = {"engine_spawned": round(created - started_at, 2)}
    if parent is not None:
        found["engine_launcher_started"] = round(max(parent["created"] - started_at, 0.0), 2)
    return found


def breakdown(arrivals: list[tuple[float, str]], processes: dict[int, dict], started_at: float,
              ready_s: float) -> dict[str, float]:
    """A start phase by phase, the same for LLMService and `vllm serve` (seconds each):
    - `launcher_s`: to the process that spawns the EngineCore (LLMService: BentoML's server
      process loading the Bento and starting worker 1; `vllm serve`: its own process, 0);
    - `imports_and_config_s`: that process imports vLLM and builds the engine's configuration;
    - `engine_imports_s`: the spawned EngineCore imports vLLM and torch again (to its first line);
    - `engine_init_s`: it loads the model, compiles, captures graphs, warms up (to its "init
      engine ... took" line);
    - `to_ready_s`: the engine up to the server's first ready answer (engine clients, API processes)."""
    marks = engine_spawn(processes, started_at)
    lines = client_phases(arrivals, started_at)
    if "engine_spawned" not in marks or "engine_core_start" not in lines or "engine_ready" not in lines:
        return {}
    launcher = marks.get("engine_launcher_started", 0.0)
    return {
        "launcher_s": launcher,
        "imports_and_config_s": round(marks["engine_spawned"] - launcher, 2),
        "engine_imports_s": round(lines["engine_core_start"] - marks["engine_spawned"], 2),
        "engine_init_s": round(lines["engine_ready"] - lines["engine_core_start"], 2),
        "to_ready_s": round(ready_s - lines["engine_ready"], 2),
    }
