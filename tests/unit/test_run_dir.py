"""Each server's run directory and its own Prometheus folder (services/run_dir.py), in a fresh
interpreter each: BentoML's container setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import ROOT

SHOW = """
import json, os
from services.run_dir import own_run_dir
from bentoml.serving import ensure_prometheus_dir
run_dir = own_run_dir()
print(json.dumps({"run_dir": str(run_dir), "prometheus": ensure_prometheus_dir()}))
"""


def run(env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_ENGINE_RUN_DIR", "PROMETHEUS_MULTIPROC_DIR")}
    done = subprocess.run([sys.executable, "-c", SHOW], cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_serving_process_gives_its_server_a_prometheus_folder_of_its_own(tmp_path: Path):
    """Two servers on one BentoML home: each folder is inside its own run directory, not the home's
    prometheus_multiproc_dir, which BentoML empties at every server start."""
    home = tmp_path / "home"
    first, second = run({"BENTOML_HOME": str(home)}), run({"BENTOML_HOME": str(home)})
    for server in (first, second):
        assert server["prometheus"] == str(Path(server["run_dir"]) / "prometheus")
    assert first["prometheus"] != second["prometheus"]
    assert not (home / "prometheus_multiproc_dir").exists()
    assert not Path(first["run_dir"]).exists(), "the run directory outlived the process that made it"


def test_a_worker_keeps_the_folder_bentoml_gave_it(tmp_path: Path):
    given = tmp_path / "given"
    given.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    worker = run({"PIPELINE_ENGINE_RUN_DIR": str(run_dir), "PROMETHEUS_MULTIPROC_DIR": str(given),
                  "BENTOML_HOME": str(tmp_path / "home")})
    assert worker["run_dir"] == str(run_dir)
    assert worker["prometheus"] != str(run_dir / "prometheus")
