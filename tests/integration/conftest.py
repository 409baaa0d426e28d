"""The real pipeline, started once per test session: `bentoml serve` of both services with the
real vLLM engine and the default model (harness/ starts and stops it). Every call has a
timeout; every process started is stopped.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from harness import ROOT, Server, own_bentoml_home, serve_pipeline

LOGS = ROOT / ".cache" / "test-logs"


@pytest.fixture(scope="session")
def pipeline():
    """The whole pipeline, served once for the session (its log: .cache/test-logs/)."""
    name = f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    served = serve_pipeline(log=LOGS / f"{name}.log", env={"BENTOML_HOME": own_bentoml_home(LOGS / name)})
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def client(pipeline: Server):
    with httpx.Client(base_url=pipeline.url, timeout=httpx.Timeout(60, connect=5)) as http:
        yield http
