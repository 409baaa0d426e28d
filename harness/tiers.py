"""The pipeline's tiers as the tests and containers start them: `start_tier(service, ...)` one tier
alone, as a container per tier runs it (BentoML's per-service `start-http-server`; PromptService
reaches LLMService at the URL `depends` gives), `serve_pipeline(...)` both under `bentoml serve`,
as ./scripts/serve.sh runs them. The tiers of one harness share `PIPELINE_INTERNAL_TOKEN`
(`INTERNAL_TOKEN`, made once per process unless the environment has one).

    llm = start_tier("LLMService", log=tmp / "llm.log"); llm.restart()   # same port
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from harness.process import READY_TIMEOUT_S, ROOT, Server, free_port

START_MODULE = "bentoml_cli._internal.start"
INTERNAL_TOKEN = os.environ.get("PIPELINE_INTERNAL_TOKEN") or secrets.token_urlsafe(32)

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
