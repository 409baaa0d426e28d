"""A server's run directory, and the server's own Prometheus multiprocess folder inside it.

`own_run_dir()` runs when a service module is imported: in the serving process it makes the run
directory (`PIPELINE_ENGINE_RUN_DIR`, mode 0700, removed at exit) and points BentoML's Prometheus
folder into it; the workers inherit both. A process that starts servers must not hand its own
run directory down to them (docs/architecture.md, "Metrics: each server its own folder").
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

RUN_DIR_ENV = "PIPELINE_ENGINE_RUN_DIR"
METRICS_FOLDER = "prometheus"


def share_run_dir() -> Path:
    """The server's run directory: made here when none is set (in the serving process, before
    it starts the workers, which inherit it); the process that made it removes it at exit."""
    if not os.environ.get(RUN_DIR_ENV):
        os.environ[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="pipeline-engine-")  # mode 0700
        atexit.register(shutil.rmtree, os.environ[RUN_DIR_ENV], ignore_errors=True)
    return Path(os.environ[RUN_DIR_ENV])


def own_run_dir() -> Path:
    """The run directory, and (in the serving process) this server's own Prometheus folder in
    it. A worker, whose PROMETHEUS_MULTIPROC_DIR BentoML has set already, changes nothing."""
    run_dir = share_run_dir()
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        from bentoml._internal.configuration.containers import BentoMLContainer

        BentoMLContainer.prometheus_multiproc_dir.set(str(run_dir / METRICS_FOLDER))
    return run_dir
