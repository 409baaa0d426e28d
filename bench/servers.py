"""Start, wait for and stop the servers the project runs: the one process harness of the tests
(tests/integration), the benchmarks (bench/, scripts/bench.py) and the device scripts
(scripts/gpu_tp_check.py, scripts/measure_serve.py).

- `start_tier(service, ...)`: one tier alone, as a container per tier runs it (deploy/kubernetes/):
  BentoML's per-service start, `python -m bentoml_cli._internal.start start-http-server <bento>
  --service-name <Service> [--depends Dep=http://host:port]` (the command the image's entry point
  runs for `start-http-server ...` arguments). LLMService alone holds the engine; PromptService
  alone reaches it at the URL its `--depends` gives.
- `serve_pipeline(...)`: `bentoml serve` of both tiers, as ./scripts/serve.sh runs it.
- `make_server("vllm" | "pipeline", EngineSettings(...), ...)`: vLLM's own OpenAI server or the
  pipeline, on the same model and engine settings (the benchmarks, the parity test).
- `Server`: one of them. `wait_ready` fails at once, with the end of the log, if the server
  exits; `stop` ends the whole process tree within seconds; `restart` starts it again on the same
  port with the same command and environment.

    llm = start_tier("LLMService", log=tmp / "llm.log")
    front = start_tier("PromptService", log=tmp / "prompt.log", depends={"LLMService": llm.url})
    with llm.llm_tier() as http: ...   # LLMService itself, with the internal token
    llm.restart()                       # same port: the front's URL stays valid
    front.stop(); llm.stop()

The tiers of one harness share a secret, `PIPELINE_INTERNAL_TOKEN` (`INTERNAL_TOKEN`, made once
per process unless the environment has one), which LLMService asks of every caller except on its
health and metrics routes; `Server.llm_tier()` sends it.

Each server runs in its own session (process group); circus gives each BentoML worker a group of
its own, so `stop` signals every descendant, not only the group. Every HTTP call has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from services.run_dir import RUN_DIR_ENV

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 480.0
START_MODULE = "bentoml_cli._internal.start"
WORKER_MODULE = "_bentoml_impl.worker.service"
INTERNAL_TOKEN = os.environ.get("PIPELINE_INTERNAL_TOKEN") or secrets.token_urlsafe(32)


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
        if self.cwd == ROOT:  # the project's modules (services, bench) importable from anywhere
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
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


# --- the pipeline's tiers ------------------------------------------------------------------------

TIER_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: a small CPU KV cache (ignored on a GPU)
    "PIPELINE_PROMPT_WORKERS": "1",
    "PIPELINE_MAX_MODEL_LEN": "2048",  # the tests' context length
    "BENTOML_DO_NOT_TRACK": "true",
    "PIPELINE_INTERNAL_TOKEN": INTERNAL_TOKEN,
    # tool calling as `vllm serve --enable-auto-tool-choice --tool-call-parser hermes --chat-template
    # hermes.jinja` (the parity tests start vLLM's server so); hermes.jinja renders a conversation
    # without tools exactly as SmolLM2's own template does
    "PIPELINE_ENABLE_AUTO_TOOL_CHOICE": "true",
    "PIPELINE_TOOL_CALL_PARSER": "hermes",
    "PIPELINE_CHAT_TEMPLATE": "hermes",
    # LLMService as two engine-client processes on one engine (as `vllm serve --api-server-count 2`)
    "PIPELINE_ENGINE_CLIENTS": "2",
}


def tier_env(**overrides: str | None) -> dict[str, str | None]:
    """A tier's environment here: TIER_DEFAULTS where this process's environment has no value of
    its own, then `overrides`."""
    return {**{k: v for k, v in TIER_DEFAULTS.items() if k not in os.environ}, **overrides}


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


def start_tier(service: str, *, log: Path, depends: dict[str, str] | None = None,
               port: int | None = None, bento: str = ".", env: dict[str, str | None] | None = None,
               wait: bool = True, ready_timeout_s: float = READY_TIMEOUT_S,
               entrypoint: Path | None = None) -> Server:
    """Start `service` alone (from the project folder, or a built Bento's tag or path as `bento`).

    `entrypoint`: run it through a Bento folder's image entry point instead, as its container
    would (`bento` is then that folder: the entry point's $BENTO_PATH and working directory).
    With `wait` (the default) it returns once /readyz answers 200, or stops the tier and raises.
    """
    port = port or free_port()
    environment = tier_env(**(env or {}))
    cwd = ROOT
    if entrypoint is not None:
        cwd = Path(bento)
        environment["BENTO_PATH"] = str(cwd)
        environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    server = Server(service, tier_command(service, port, bento=bento, depends=depends, entrypoint=entrypoint),
                    environment, port, log, cwd=cwd)
    return server.start_and_wait(ready_timeout_s) if wait else server.start()


def serve_command(port: int) -> list[str]:
    """`bentoml serve` of the whole pipeline, on the loopback interface."""
    return [sys.executable, "-m", "bentoml", "serve", "services.front.prompt_service:PromptService",
            "--host", "127.0.0.1", "--port", str(port)]


def serve_pipeline(*, log: Path, env: dict[str, str | None] | None = None, port: int | None = None,
                   ready_timeout_s: float = READY_TIMEOUT_S) -> Server:
    """`bentoml serve` of both tiers (as ./scripts/serve.sh runs it), returned once ready."""
    port = port or free_port()
    return Server("pipeline", serve_command(port), tier_env(**(env or {})), port, log).start_and_wait(ready_timeout_s)


def own_bentoml_home(folder: Path) -> str:
    """A BENTOML_HOME for one server, sharing the model store. (BentoML empties its home's
    prometheus_multiproc_dir whenever a server starts; the pipeline's servers keep their metrics in
    their own run directory instead, services/run_dir.py, so this is no longer needed for that.)"""
    folder.mkdir(parents=True, exist_ok=True)
    models = folder / "models"
    if not models.exists():
        default_home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
        models.symlink_to(default_home / "models")
    return str(folder)


# --- the pipeline and vLLM's own server on the same engine settings ------------------------------


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
    kv_cache_memory_bytes: int | None = None  # set: no memory profiling, so servers can share a GPU
    max_num_seqs: int | None = None
    cpu: bool = False  # vllm-cpu: KV-cache size and thread binding through the environment
    cpu_kvcache_gib: int = 2


def cpu_engine_env(settings: EngineSettings) -> dict[str, str]:
    if not settings.cpu:
        return {}
    # The same values the pipeline's LLMService sets for itself.
    from services.gpu.engine_args import cpu_engine_environment

    return cpu_engine_environment(settings.cpu_kvcache_gib)


def vllm_command(settings: EngineSettings, port: int, api_servers: int | None = None) -> tuple[list[str], dict[str, str]]:
    """vLLM's OpenAI server; with `api_servers`, through the `vllm serve` CLI with
    `--api-server-count` (the module entry point accepts that flag and ignores it)."""
    start = ["-m", "vllm.entrypoints.openai.api_server", "--model", settings.model]
    if api_servers is not None:
        start = ["-m", "bench.vllm_cli", "serve", settings.model, "--api-server-count", str(api_servers)]
    argv = [
        sys.executable, *start,
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
    if settings.kv_cache_memory_bytes:
        argv += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)]
    return argv, cpu_engine_env(settings)


def pipeline_command(settings: EngineSettings, port: int, prompt_workers: int,
                     engine_clients: int | None = None) -> tuple[list[str], dict[str, str]]:
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
        "PIPELINE_INTERNAL_TOKEN": INTERNAL_TOKEN,  # known here, so LLMService can be called directly
        **cpu_engine_env(settings),
    }
    if settings.max_num_seqs:
        env["PIPELINE_MAX_NUM_SEQS"] = str(settings.max_num_seqs)
    if settings.kv_cache_memory_bytes:
        env["PIPELINE_KV_CACHE_MEMORY_BYTES"] = str(settings.kv_cache_memory_bytes)
    if engine_clients is not None:
        env["PIPELINE_ENGINE_CLIENTS"] = str(engine_clients)
    return serve_command(port), env


TARGET = re.compile(r"vllm(?:-api(?P<api_servers>[1-9][0-9]*))?|pipeline(?:-ec(?P<engine_clients>[1-9][0-9]*))?")


def parse_target(target: str) -> tuple[str, int | None]:
    """`vllm`, `vllm-apiN` (`vllm serve --api-server-count N`), `pipeline`, `pipeline-ecN`
    (PIPELINE_ENGINE_CLIENTS=N): the server kind and its process count, if given."""
    match = TARGET.fullmatch(target)
    if not match:
        raise ValueError(f"unknown target {target!r}: vllm, vllm-apiN, pipeline or pipeline-ecN")
    count = match["api_servers"] or match["engine_clients"]
    return target.split("-")[0], int(count) if count else None


def make_server(target: str, settings: EngineSettings, port: int, log_dir: Path, prompt_workers: int = 1,
                vllm_args: Sequence[str] = ()) -> Server:
    """vLLM's own OpenAI server (`vllm` or `vllm-apiN`, with `vllm_args` added to its command
    line) or the pipeline (`pipeline` or `pipeline-ecN`), not started yet."""
    kind, count = parse_target(target)
    if kind == "vllm":
        argv, env = vllm_command(settings, port, api_servers=count)
        return Server(target, [*argv, *vllm_args], env, port, log_dir / f"server-{target}.log", ready_path="/health",
                      live_path=None)
    argv, env = pipeline_command(settings, port, prompt_workers, engine_clients=count)
    return Server(target, argv, env, port, log_dir / f"server-{target}.log")


def gpu_host_processes(server: Server) -> list[psutil.Process]:
    """What runs on the GPU machine: all of vLLM's server, or the pipeline's LLMService workers
    and their engine processes (PromptService could run elsewhere)."""
    if server.name.startswith("vllm"):
        return server.tree()
    return [p for worker in server.workers().get("LLMService", []) for p in [worker, *worker.children(recursive=True)]]


def pin(processes: list[psutil.Process], cpus: set[int]) -> int:
    """Every thread of `processes` onto `cpus` (threads they start later inherit it); returns
    the number of threads pinned."""
    pinned = 0
    for process in processes:
        for thread in Path(f"/proc/{process.pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(thread.name), cpus)
                pinned += 1
            except OSError:
                pass
    return pinned


def parse_cpus(text: str) -> set[int]:
    """`0-1,4` -> {0, 1, 4} (taskset's list form)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus
