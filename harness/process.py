"""One server process tree: start it, wait until it answers, stop it and everything under it.

`Server` runs a command in a session of its own; `wait_ready` fails at once, with the end of the
log, if the process exits; `stop` signals every descendant (circus gives each BentoML worker a group
of its own) and ends the whole tree within seconds; `restart` starts it again on the same port.

    server = Server("name", argv, env, free_port(), log).start_and_wait()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from services.run_dir import RUN_DIR_ENV

ROOT = Path(__file__).resolve().parent.parent  # the project folder: the servers' working directory
READY_TIMEOUT_S = 480.0
WORKER_MODULE = "_bentoml_impl.worker.service"


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(read, until, within_s: float, every_s: float = 0.1):
    """Call `read()` until `until(value)` holds or `within_s` has passed; the last value read."""
    deadline = time.monotonic() + within_s
    while not until(value := read()) and time.monotonic() < deadline:
        time.sleep(every_s)
    return value


@dataclass
class Server:
    """One server: its command, environment (on top of this process's; a None value unsets a
    variable), port, log, and the process once started."""

    name: str
    argv: list[str]
    env: dict[str, str | None]
    port: int
    log: Path
    ready_path: str = "/readyz"
    live_path: str | None = "/livez"  # recorded as `live_after_s` while waiting; None: not probed
    cwd: Path = ROOT
    process: subprocess.Popen | None = field(default=None, repr=False)
    live_after_s: float | None = None
    ready_after_s: float | None = None
    _started: float = field(default=0.0, repr=False)
    _starts: int = field(default=0, repr=False)
    _stopped: bool = field(default=True, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_headers(self) -> dict[str, str]:
        """What a call to LLMService carries: the PIPELINE_INTERNAL_TOKEN this server was given."""
        token = self.environment().get("PIPELINE_INTERNAL_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def environment(self) -> dict[str, str]:
        # A run directory belongs to one server (services/run_dir.py): this process has one of its
        # own once it imported a service module (the tests do), and a server handed it would share
        # engine sockets and engine.json with every other server started from here.
        inherited = {name: value for name, value in os.environ.items() if name != RUN_DIR_ENV}
        env = {**inherited, "PYTHONUNBUFFERED": "1", **self.env}
        return {name: value for name, value in env.items() if value is not None}

    def start(self) -> Server:
        """Start the command (a first start empties the log; a restart appends to it)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a" if self._starts else "w") as out:
            out.write(f"=== {' '.join(self.argv)}\n")
            out.flush()
            self._started = time.monotonic()
            self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=self.environment(), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._starts += 1
        self._stopped = False
        self.live_after_s = self.ready_after_s = None
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds from the start until `ready_path` answers 200 (also recording when `live_path`
        first did). Raises at once if the server exits, and after `timeout_s` from its start, with
        the end of its log in the message."""
        assert self.process is not None, "start() first"
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(3, connect=2)) as http:
            while (waited := time.monotonic() - self._started) < timeout_s:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with code {self.process.returncode} before it was "
                                       f"ready; log tail:\n{self.log_tail()}")
                try:
                    if self.live_path and self.live_after_s is None and http.get(self.live_path).status_code == 200:
                        self.live_after_s = time.monotonic() - self._started
                    if http.get(self.ready_path).status_code == 200:
                        self.ready_after_s = time.monotonic() - self._started
                        return self.ready_after_s
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"{self.name} at {self.url} not ready after {waited:.0f} s; log tail:\n{self.log_tail()}")

    def start_and_wait(self, ready_timeout_s: float = READY_TIMEOUT_S) -> Server:
        """Start, and return once ready; a server that does not get ready is stopped."""
        self.start()
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, *, wait: bool = True, ready_timeout_s: float = READY_TIMEOUT_S) -> Server:
        """Stop, and start again with the same command, port and environment."""
        self.stop()
        return self.start_and_wait(ready_timeout_s) if wait else self.start()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def client(self, timeout_s: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5))

    def llm_tier(self, timeout_s: float = 10) -> httpx.Client:
        """A client straight to LLMService, carrying the internal token: this server itself when
        it is the LLMService tier alone, else LLMService's Unix socket under `bentoml serve`."""
        timeout = httpx.Timeout(timeout_s, connect=5)
        if self.name == "LLMService":
            return httpx.Client(base_url=self.url, headers=self.internal_headers, timeout=timeout)
        transport = httpx.HTTPTransport(uds=self.llm_socket())
        return httpx.Client(transport=transport, base_url="http://llm-service", headers=self.internal_headers,
                            timeout=timeout)

    def engine_load(self) -> int:
        """Requests LLMService's engine holds now, running or waiting (its /load)."""
        with self.llm_tier() as llm:
            return llm.post("/load", json={}).raise_for_status().json()["unfinished_requests"]

    def wait_engine_idle(self, within_s: float) -> tuple[int, float]:
        """Poll the engine until it holds no request or `within_s` has passed: (its load then,
        seconds waited)."""
        started = time.monotonic()
        with self.llm_tier() as llm:
            while True:
                load = llm.post("/load", json={}).raise_for_status().json()["unfinished_requests"]
                waited = time.monotonic() - started
                if load == 0 or waited > within_s:
                    return load, waited
                time.sleep(0.02)

    def llm_socket(self) -> str:
        """LLMService's Unix socket under `bentoml serve`, as BentoML gives it to PromptService's
        workers (BENTOML_RUNNER_MAP)."""
        for process in self.tree()[1:]:
            try:
                env = process.environ()
            except psutil.Error:
                continue
            if "BENTOML_RUNNER_MAP" in env:
                url = json.loads(env["BENTOML_RUNNER_MAP"])["LLMService"]
                if url.startswith("file://"):
                    return url.removeprefix("file://")
                raise RuntimeError(f"LLMService is at {url}, not a Unix socket; unset BENTOML_NO_UDS")
        raise RuntimeError(f"no PromptService worker with BENTOML_RUNNER_MAP under {self.name}")

    def tree(self) -> list[psutil.Process]:
        """The started process and all its descendants (empty once it has exited)."""
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pids(self) -> list[int]:
        return [process.pid for process in self.tree()]

    def workers(self) -> dict[str, list[psutil.Process]]:
        """BentoML worker processes under this server, by the service name they serve."""
        found: dict[str, list[psutil.Process]] = {}
        for child in self.tree()[1:]:
            try:
                args = child.cmdline()
            except psutil.Error:
                continue
            if WORKER_MODULE in args and "--service-name" in args:
                found.setdefault(args[args.index("--service-name") + 1], []).append(child)
        return found

    def engine_processes(self) -> list[psutil.Process]:
        """vLLM engine processes (EngineCore, workers) under this server."""
        engines = []
        for child in self.tree()[1:]:
            try:
                if child.name().startswith("VLLM::") or "VLLM::" in " ".join(child.cmdline()):
                    engines.append(child)
            except psutil.Error:
                continue
        return engines

    def engine_cores(self) -> list[psutil.Process]:
        """vLLM's EngineCore processes under this server (one per engine)."""
        return [process for process in self.engine_processes() if "EngineCore" in process.name()]

    def engine_client_readiness(self, within_s: float = 10) -> dict[int, int]:
        """LLMService's /readyz status from each of its workers (engine clients), by number.

        Each new connection goes to whichever worker accepts it; on each, /load says which
        worker it is, then /readyz asks that worker. New connections are tried until every
        worker has answered or `within_s` has passed."""
        count = len(self.workers().get("LLMService", [])) or 1
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + within_s
        while len(statuses) < count and time.monotonic() < deadline:
            with self.llm_tier(timeout_s=5) as llm:  # a new client: a new connection
                worker = llm.post("/load", json={}).raise_for_status().json()["engine_client"]
                statuses[worker] = llm.get("/readyz").status_code
        return statuses

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the process group and every descendant; SIGKILL what is left after timeout_s.

        circus, the BentoML worker and vLLM's engine core leave within seconds; vLLM's worker
        processes wait ~30 s for an engine that is gone, so once only they (and the resource
        tracker they hold) remain, they get SIGKILL and the tracker is left to clean up and exit.
        Stopping a stopped server does nothing.
        """
        if self.process is None or self._stopped:
            return
        self._stopped = True
        tree = self.tree()
        _signal_group(self.process.pid, signal.SIGTERM)  # start_new_session: the group id is the leader's pid
        for process in tree:
            try:
                process.terminate()
            except psutil.Error:
                pass
        deadline = time.monotonic() + timeout_s
        while (alive := _running(tree)) and time.monotonic() < deadline:
            leftovers = [p for p in alive if _is_engine_leftover(p)]
            if len(leftovers) == len(alive):
                for process in leftovers:
                    if not _is_resource_tracker(process):
                        _kill(process)
                psutil.wait_procs(leftovers, timeout=5)
                break
            time.sleep(0.2)
        for process in _running(tree):
            _kill(process)  # psutil checks it is still the same process (pid and start time)
        psutil.wait_procs(tree, timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.Error:
            pass
    return running


def _is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _is_engine_leftover(process: psutil.Process) -> bool:
    try:
        return _is_resource_tracker(process) or process.name().startswith("VLLM::Worker") \
            or "VLLM::Worker" in " ".join(process.cmdline())
    except psutil.Error:
        return True


def _kill(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.Error:
        pass

