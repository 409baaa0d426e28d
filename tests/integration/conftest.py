"""The real pipeline, started once per test session: `bentoml serve` of both services with the
real vLLM engine and the default model. Every call has a timeout; every process started is stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_env(**overrides: str) -> dict[str, str]:
    """Environment for anything that starts the engine here: small KV cache, both cores."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("PIPELINE_PROMPT_WORKERS", "1")
    env.setdefault("PIPELINE_MAX_MODEL_LEN", "2048")  # the tests' limits are stated against it
    env.update(overrides)
    return env


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Seconds until GET url/readyz answers 200; fails at once if the process dies."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=3).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def stop_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it and of its descendants."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for leftover in [*descendants, psutil.Process(process.pid) if process.poll() is None else None]:
        if leftover is None:
            continue
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait(timeout=10)


@dataclass
class Pipeline:
    url: str
    process: subprocess.Popen
    log: Path
    ready_after_s: float

    def workers(self) -> dict[str, psutil.Process]:
        """The BentoML worker process of each service, by service name."""
        found = {}
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                args = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "_bentoml_impl.worker.service" in " ".join(args) and "--service-name" in args:
                found[args[args.index("--service-name") + 1]] = child
        return found

    def llm_tier(self) -> httpx.Client:
        """A client straight to LLMService (its Unix socket), to look at the engine itself."""
        worker = self.workers()["LLMService"]
        for connection in worker.net_connections(kind="unix"):
            if connection.laddr and connection.laddr.endswith(".sock"):
                transport = httpx.HTTPTransport(uds=connection.laddr)
                return httpx.Client(transport=transport, base_url="http://llm-service", timeout=10)
        raise RuntimeError("LLMService's socket not found")


def own_bentoml_home(folder: Path) -> str:
    """A BENTOML_HOME for one server, sharing the model store: BentoML empties
    $BENTOML_HOME/prometheus_multiproc_dir whenever a server starts, which would wipe the metrics
    of any other server using the same home (docs/operations.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = folder / "models"
    if not models.exists():
        default_home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
        models.symlink_to(default_home / "models")
    return str(folder)


def start_pipeline(log: Path, **env: str) -> Pipeline:
    port = free_port()
    env.setdefault("BENTOML_HOME", own_bentoml_home(log.parent / f"bentoml-home-{port}"))
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "services.prompt_service:PromptService",
         "--port", str(port), "--host", "127.0.0.1"],
        cwd=ROOT,
        env=engine_env(**env),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready_after = wait_ready(url, process)
    except Exception:
        stop_process_tree(process)
        print(log.read_text()[-5000:])
        raise
    return Pipeline(url=url, process=process, log=log, ready_after_s=ready_after)


LOGS = ROOT / ".cache" / "test-logs"


@pytest.fixture(scope="session")
def pipeline():
    """The whole pipeline, served once for the session (its log: .cache/test-logs/)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    served = start_pipeline(LOGS / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    try:
        yield served
    finally:
        stop_process_tree(served.process)


@pytest.fixture
def client(pipeline: Pipeline):
    with httpx.Client(base_url=pipeline.url, timeout=httpx.Timeout(60, connect=5)) as http:
        yield http
