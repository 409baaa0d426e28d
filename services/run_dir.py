"""A server's run directory, and the server's own Prometheus multiprocess folder inside it.

Both tiers call `own_run_dir()` when their service module is imported. In the serving process
(`bentoml serve`, or `start-http-server` of one tier), which imports the module before it starts
its workers, this makes the run directory (`PIPELINE_ENGINE_RUN_DIR`, mode 0700, removed when that
process exits) and points BentoML's Prometheus multiprocess folder into it. The workers inherit
the environment, so they find the same directory and do nothing.

Why the metrics folder: BentoML keeps its workers' Prometheus multiprocess files in
`$BENTOML_HOME/prometheus_multiproc_dir` and empties that folder whenever a server starts
(`bentoml.serving.ensure_prometheus_dir`). Two servers on one host with one BentoML home (two
replicas on one GPU host, or the tiers side by side) would wipe and then report each other's
series. Its caller reads the folder from BentoML's container setting, after the service module
has been imported (bentoml_cli's `serve` and `start-http-server` load the service first), so
setting it here gives each server a folder of its own.

Any process that imports a service module gets a run directory this way, the test process too.
A process that then starts servers must not hand it down (harness/process.py leaves it out of
every server's environment): servers sharing one would share the engine's sockets and
`engine.json`, and a new server's engine client would take another's engine for the one it had
joined before, and stop it.
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
