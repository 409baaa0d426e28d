"""The real pipeline, started once per test session: `bentoml serve` of both services with the
real vLLM engine and the default model (tiers.py starts and stops it). Every call has a timeout;
every process started is stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from tiers import ROOT, Tier, serve_pipeline

LOGS = ROOT / ".cache" / "test-logs"


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
def client(pipeline: Tier):
    with httpx.Client(base_url=pipeline.url, timeout=httpx.Timeout(60, connect=5)) as http:
        yield http
