"""Start one tier of the pipeline on its own, as a container per tier does (deploy/kubernetes/).

Each tier is BentoML's per-service start, `python -m bentoml_cli._internal.start start-http-server
<bento> --service-name <Service> [--depends Dep=http://host:port]`: the command the image's entry
point runs for `start-http-server ...` arguments. LLMService alone holds the engine; PromptService
alone reaches it over HTTP at the URL its `--depends` gives.

    llm = start_tier("LLMService", log=tmp / "llm.log")
    front = start_tier("PromptService", log=tmp / "prompt.log", depends={"LLMService": llm.url})
    ...
    llm = llm.restart()          # same port and arguments: the front's URL stays valid
    front.stop(); llm.stop()

Every HTTP call has a timeout; `stop()` ends the whole process tree (circus gives each worker its
own process group, so killing the starter's group alone is not enough).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
START_MODULE = "bentoml_cli._internal.start"
READY_TIMEOUT_S = 480.0
WORKER_MODULE = "_bentoml_impl.worker.service"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tier_command(service: str, port: int, *, bento: str = ".", host: str = "127.0.0.1",
                 depends: dict[str, str] | None = None, entrypoint: Path | None = None) -> list[str]:
    """The per-service start command line.

    With `entrypoint` (a Bento's env/docker/entrypoint.sh), the image's entry point is run with the
    arguments deploy/kubernetes/ gives the container; it appends $BENTO_PATH itself.
    """
    args = ["--service-name", service, "--host", host, "--port", str(port)]
    for name, url in (depends or {}).items():
        args += ["--depends", f"{name}={url}"]
    if entrypoint is not None:
        return ["bash", str(entrypoint), "start-http-server", *args]
    return [sys.executable, "-m", START_MODULE, "start-http-server", bento, *args]


def tier_env(**overrides: str) -> dict[str, str]:
    """Environment for a tier here: a small CPU KV cache, one front worker, the tests' context length."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("PIPELINE_PROMPT_WORKERS", "1")
    env.setdefault("PIPELINE_MAX_MODEL_LEN", "2048")  # as tests/integration/conftest.py
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # tool calling as `vllm serve --enable-auto-tool-choice --tool-call-parser hermes --chat-template
    # hermes.jinja` (the parity tests start vLLM's server so); hermes.jinja renders a conversation
    # without tools exactly as SmolLM2's own template does
    env.setdefault("PIPELINE_ENABLE_AUTO_TOOL_CHOICE", "true")
    env.setdefault("PIPELINE_TOOL_CALL_PARSER", "hermes")
    env.setdefault("PIPELINE_CHAT_TEMPLATE", "hermes")
    env.update(overrides)
    return env


@dataclass
class Tier:
    """One running tier: its service name, URL, starter process and log."""

    service: str
    port: int
    process: subprocess.Popen
    log: Path
    command: list[str]
    env: dict[str, str] = field(repr=False)
    cwd: Path = ROOT
    live_after_s: float | None = None
    ready_after_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout_s: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5))

    def workers(self) -> dict[str, list[psutil.Process]]:
        """BentoML worker processes under this tier, by the service name they serve."""
        found: dict[str, list[psutil.Process]] = {}
        for child in self._tree()[1:]:
            try:
                args = child.cmdline()
            except psutil.Error:
                continue
            if WORKER_MODULE in args and "--service-name" in args:
                found.setdefault(args[args.index("--service-name") + 1], []).append(child)
        return found

    def llm_tier(self) -> httpx.Client:
        """A client straight to this tier's LLMService worker (its Unix socket under `bentoml
        serve`), to look at the engine itself."""
        for worker in self.workers().get("LLMService", []):
            for connection in worker.net_connections(kind="unix"):
                if connection.laddr and connection.laddr.endswith(".sock"):
                    transport = httpx.HTTPTransport(uds=connection.laddr)
                    return httpx.Client(transport=transport, base_url="http://llm-service", timeout=10)
        raise RuntimeError("no LLMService socket under this tier")

    def engine_processes(self) -> list[psutil.Process]:
        """vLLM engine processes (EngineCore, workers) under this tier."""
        engines = []
        for child in self._tree()[1:]:
            try:
                if "VLLM::" in " ".join(child.cmdline()) or child.name().startswith("VLLM::"):
                    engines.append(child)
            except psutil.Error:
                continue
        return engines

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds from now until GET /readyz answers 200; records when /livez first answered.

        Fails at once if the starter exits, with the end of its log in the message.
        """
        started = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(3, connect=2)) as http:
            while time.monotonic() - started < timeout_s:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.service} exited with code {self.process.returncode} before it was "
                        f"ready; log tail:\n{self.log_tail()}"
                    )
                try:
                    if self.live_after_s is None and http.get("/livez").status_code == 200:
                        self.live_after_s = time.monotonic() - started
                    if http.get("/readyz").status_code == 200:
                        self.ready_after_s = time.monotonic() - started
                        return self.ready_after_s
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"{self.service} at {self.url} not ready after {timeout_s} s; "
                           f"log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the starter and every descendant; SIGKILL what is left after timeout_s.

        circus, the BentoML worker and vLLM's engine core leave within seconds; vLLM's worker
        processes wait ~30 s for an engine that is gone, so once only they (and the resource
        tracker they hold) remain, they get SIGKILL and the tracker is left to clean up and exit.
        """
        tree = self._tree()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
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
            _kill(process)
        psutil.wait_procs(tree, timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def restart(self, *, wait: bool = True, ready_timeout_s: float = READY_TIMEOUT_S) -> Tier:
        """Stop this tier and start it again with the same command, port and environment."""
        self.stop()
        return launch(self.service, self.port, self.command, self.env, self.log, wait, ready_timeout_s, self.cwd)

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


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


def start_tier(service: str, *, log: Path, depends: dict[str, str] | None = None,
               port: int | None = None, bento: str = ".", env: dict[str, str] | None = None,
               wait: bool = True, ready_timeout_s: float = READY_TIMEOUT_S,
               entrypoint: Path | None = None) -> Tier:
    """Start `service` alone (from the project folder, or a built Bento's tag or path as `bento`).

    `entrypoint`: run it through a Bento folder's image entry point instead, as its container
    would (`bento` is then that folder: the entry point's $BENTO_PATH and working directory).
    With `wait` (the default) it returns once /readyz answers 200, or stops the tier and raises.
    """
    port = port or free_port()
    command = tier_command(service, port, bento=bento, depends=depends, entrypoint=entrypoint)
    environment = tier_env(**(env or {}))
    cwd = ROOT
    if entrypoint is not None:
        cwd = Path(bento)
        environment["BENTO_PATH"] = str(cwd)
        environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    return launch(service, port, command, environment, log, wait, ready_timeout_s, cwd)


def serve_pipeline(*, log: Path, env: dict[str, str] | None = None,
                   ready_timeout_s: float = READY_TIMEOUT_S) -> Tier:
    """`bentoml serve` of the whole pipeline (both services, as ./scripts/serve.sh runs it)."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", "services.prompt_service:PromptService",
               "--host", "127.0.0.1", "--port", str(port)]
    return launch("PromptService", port, command, tier_env(**(env or {})), log, True, ready_timeout_s)


def launch(service: str, port: int, command: list[str], env: dict[str, str], log: Path,
            wait: bool, ready_timeout_s: float, cwd: Path = ROOT) -> Tier:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n=== {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    tier = Tier(service=service, port=port, process=process, log=log, command=command, env=env, cwd=cwd)
    if wait:
        try:
            tier.wait_ready(ready_timeout_s)
        except BaseException:
            tier.stop()
            raise
    return tier
