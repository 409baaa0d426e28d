"""Run the pipeline's CPU container image as a user would, and write down what happened.

    python scripts/container_check.py inspect IMAGE [IMAGE...] --out docs/container/image-NAME.json
    python scripts/container_check.py run IMAGE --out docs/container/check-cpu.json   # starts engines:
                                                                       # run it under the engine lock

`inspect`: each image's id, size, user, entry point, ports, environment names, the model files it
carries and its Python packages, and the hygiene checks (non-root, no token or key in the
environment or the build history, the model inside).

`run`, in this order (every wait has a deadline; each container is removed afterwards):
1. PromptService alone with a `--depends` URL where nothing listens: it must stay up, /livez 200,
   /readyz 503, and /generate 503 with Retry-After (the GPU tier reported down, no crash);
2. LLMService with its model store empty (a tmpfs over the image's models/): it must exit, not
   serve, with an error that names the missing model;
3. one container per tier, started with deploy/kubernetes/'s own container arguments (read from the
   manifests; only the host becomes 127.0.0.1, the port a free one, the --depends URL that port),
   the ConfigMap's settings and one shared PIPELINE_INTERNAL_TOKEN: the README's curl, the OpenAI
   client (models, chat, a stream), Docker's health check on the front (`--health-cmd`: GET
   /readyz) healthy; then the LLM container is stopped (front /readyz 503, /generate 503 with
   Retry-After, /livez 200, Docker health unhealthy) and started again (front /readyz 200, answers
   again); then both stop cleanly (`docker stop`: exit before the grace period, not killed);
4. the whole Bento in one container, as `docker run IMAGE` starts it (`bentoml serve`, both tiers),
   with PORT and BENTOML_HOST set: the README's curl and the OpenAI client, a clean stop.

Every container uses the host's network (`--network host`) and binds 127.0.0.1 only: the tiers talk
over loopback, and nothing else is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
README_PROMPT = "What is the capital of France?"
LOCAL = "127.0.0.1"
READY_TIMEOUT_S = 900.0  # an engine start on this shared 2-core machine: 1 to 5 minutes
STOP_GRACE_S = 60  # the manifests' terminationGracePeriodSeconds
# What a CPU machine needs on top of the manifests' settings (as harness/tiers.py's tier_env).
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "PIPELINE_MAX_MODEL_LEN": "2048", "PIPELINE_PROMPT_WORKERS": "1"}
SECRET_MARKERS = ("HF_TOKEN=", "hf_", "PIPELINE_API_KEYS=", "PIPELINE_INTERNAL_TOKEN=", "--mount=type=secret")


def log(message: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S', time.gmtime())}] {message}", flush=True)


def docker(*args: str, timeout_s: float = 120, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        return sock.getsockname()[1]


class CheckFailed(AssertionError):
    pass


class Report:
    """The checks, in order, with their details; written as JSON."""

    def __init__(self, path: Path, image: str) -> None:
        self.path = path
        self.data: dict = {"image": image, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "checks": [], "containers": {}}

    def check(self, name: str, ok: bool, detail: object = None) -> None:
        self.data["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        log(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail is not None else ""))
        self.save()
        if not ok:
            raise CheckFailed(name)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


# --- the manifests ------------------------------------------------------------------------------

def manifest(name: str, kind: str = "Deployment") -> dict:
    for path in K8S.glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] == kind and document["metadata"]["name"] == name:
                return document
    raise LookupError(f"{kind}/{name} not in {K8S}")


def tier_start(deployment: str, port: int, depends_url: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The Deployment's container arguments (host 127.0.0.1, this port, this --depends URL) and
    its environment: the ConfigMap's data, the container's plain `value` entries, CPU_ENV."""
    container = manifest(deployment)["spec"]["template"]["spec"]["containers"][0]
    args = list(container["args"])
    for flag, value in (("--host", LOCAL), ("--port", str(port))):
        args[args.index(flag) + 1] = value
    if "--depends" in args:
        name, _ = args[args.index("--depends") + 1].split("=", 1)
        args[args.index("--depends") + 1] = f"{name}={depends_url}"
    env = dict(manifest("llm-pipeline-config", "ConfigMap")["data"])
    env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    env.update(CPU_ENV)
    return args, env


# --- containers ---------------------------------------------------------------------------------

class Container:
    """One `docker run -d --network host` container serving on 127.0.0.1:port."""

    def __init__(self, name: str, image: str, port: int, args: list[str], env: dict[str, str],
                 extra: list[str] | None = None) -> None:
        self.name, self.image, self.port, self.args, self.env = name, image, port, args, env
        self.extra = extra or []
        self.url = f"http://{LOCAL}:{port}"
        self.command: list[str] = []
        self.started = 0.0

    def run(self) -> Container:
        docker("rm", "-f", self.name, check=False)
        self.command = ["docker", "run", "-d", "--name", self.name, "--network", "host", *self.extra]
        for key, value in self.env.items():
            self.command += ["-e", f"{key}={value}"]
        self.command += [self.image, *self.args]
        log("$ " + " ".join(self.shown_command()))
        self.started = time.monotonic()
        docker(*self.command[1:])
        return self

    def start_again(self) -> None:
        self.started = time.monotonic()
        docker("start", self.name)

    def shown_command(self) -> list[str]:
        """The command with the internal token's value hidden."""
        return [part.split("=", 1)[0] + "=***" if part.startswith("PIPELINE_INTERNAL_TOKEN=") else part
                for part in self.command]

    def state(self) -> dict:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name))

    def logs(self, tail: int = 60) -> str:
        result = subprocess.run(["docker", "logs", "--tail", str(tail), self.name], capture_output=True,
                                text=True, timeout=60)
        return result.stdout + result.stderr

    def wait(self, path: str, status: int, timeout_s: float = READY_TIMEOUT_S, since: float | None = None) -> float:
        """Seconds since the start (or `since`) until GET path answers `status`; fails if the
        container exits."""
        since = self.started if since is None else since
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(5, connect=2)) as http:
            while time.monotonic() < deadline:
                try:
                    if http.get(path).status_code == status:
                        return round(time.monotonic() - since, 1)
                except httpx.HTTPError:
                    pass
                if not self.state()["Running"]:
                    raise CheckFailed(f"{self.name} exited before {path} answered {status}:\n{self.logs()}")
                time.sleep(0.5)
        raise CheckFailed(f"{self.name}: {path} did not answer {status} within {timeout_s} s:\n{self.logs()}")

    def wait_exit(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.state()
            if not state["Running"] and not state["Restarting"]:
                return state
            time.sleep(1)
        raise CheckFailed(f"{self.name} still running after {timeout_s} s:\n{self.logs()}")

    def stop(self) -> dict:
        """`docker stop` (SIGTERM, then SIGKILL after the grace period): how long, how it ended."""
        started = time.monotonic()
        docker("stop", "-t", str(STOP_GRACE_S), self.name, timeout_s=STOP_GRACE_S + 60)
        state = self.state()
        return {"stop_s": round(time.monotonic() - started, 1), "exit_code": state["ExitCode"],
                "oom_killed": state["OOMKilled"]}

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


def health_options(port: int) -> list[str]:
    """A Docker HEALTHCHECK for a tier (the image has none: the port is a start argument)."""
    probe = f"import urllib.request; urllib.request.urlopen('http://{LOCAL}:{port}/readyz', timeout=3)"
    return ["--health-cmd", f'python -c "{probe}"', "--health-interval", "5s", "--health-timeout", "4s",
            "--health-retries", "2", "--health-start-period", "20m"]


def wait_health(container: Container, status: str, timeout_s: float) -> float:
    """Seconds until Docker's health status of the container is `status`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if (container.state().get("Health") or {}).get("Status") == status:
            return round(time.monotonic() - started, 1)
        time.sleep(1)
    raise CheckFailed(f"{container.name}: Docker health not {status!r} within {timeout_s} s: {container.state().get('Health')}")


def check_clean_stop(report: Report, container: Container) -> None:
    stopped = container.stop()
    report.data["containers"].setdefault(container.name, {})["stop"] = stopped
    # SIGKILL after the grace period shows as 137; BentoML's own shutdown on SIGTERM is quicker.
    report.check(f"{container.name}: stops cleanly on SIGTERM", stopped["exit_code"] != 137
                 and stopped["stop_s"] < STOP_GRACE_S and not stopped["oom_killed"], stopped)


# --- what a user does -----------------------------------------------------------------------------

def readme_curl(url: str, body: str | None = None) -> tuple[int, str]:
    """The README's curl, against this URL."""
    body = body or json.dumps({"prompt": README_PROMPT})
    result = subprocess.run(["curl", "-sS", "-N", f"{url}/generate", "-H", "Content-Type: application/json",
                             "-d", body, "-w", "\n%{http_code}", "--max-time", "120"],
                            capture_output=True, text=True, timeout=150)
    text, _, code = result.stdout.rpartition("\n")
    return int(code or 0), text


def openai_answers(url: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("PIPELINE_API_KEY", "none"), timeout=120,
                    max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": README_PROMPT}]
    chat = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=20,
                                            stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return {"model": model, "chat": chat.choices[0].message.content, "stream": streamed,
            "usage": chat.usage.model_dump() if chat.usage else None}


GREEDY = json.dumps({"prompt": README_PROMPT, "temperature": 0, "max_tokens": 20})


def check_serves(report: Report, name: str, url: str) -> str:
    """The README's curl, a greedy /generate (twice: the same answer) and the OpenAI client
    (chat, and the same chat streamed). Returns the greedy answer."""
    code, text = readme_curl(url)
    report.check(f"{name}: README curl answers", code == 200 and text.strip() != "", {"status": code, "text": text})
    (code, greedy), (again_code, again) = readme_curl(url, GREEDY), readme_curl(url, GREEDY)
    # Whether the answer is right is the integration tests' business; what is recorded here is
    # that the image serves, and serves the same greedy answer each time.
    report.check(f"{name}: greedy /generate answers, the same twice",
                 code == again_code == 200 and greedy.strip() != "" and greedy == again,
                 {"status": code, "text": greedy, "says_paris": "Paris" in greedy})
    answers = openai_answers(url)
    report.check(f"{name}: OpenAI client (models, chat, the same chat streamed)",
                 answers["chat"].strip() != "" and answers["stream"] == answers["chat"],
                 {**answers, "says_paris": "Paris" in answers["chat"]})
    return greedy


def check_gpu_tier_down(report: Report, name: str, front: Container) -> None:
    with httpx.Client(base_url=front.url, timeout=30) as http:
        ready, live = http.get("/readyz"), http.get("/livez")
        generate = http.post("/generate", json={"prompt": README_PROMPT, "max_tokens": 5})
    detail = {"readyz": ready.status_code, "livez": live.status_code, "generate": generate.status_code,
              "retry_after": generate.headers.get("retry-after"), "body": generate.text[:300]}
    report.check(f"{name}: GPU tier reported down (503 + Retry-After, not ready, still live)",
                 ready.status_code == 503 and live.status_code == 200 and generate.status_code == 503
                 and generate.headers.get("retry-after") is not None and front.state()["Running"], detail)


def run_checks(image: str, report: Report) -> None:
    token = secrets.token_hex(16)  # one PIPELINE_INTERNAL_TOKEN for both tiers of a deployment
    prefix = f"llmp-check-{os.getpid()}"
    containers: list[Container] = []

    def container(name: str, *args, **kwargs) -> Container:
        made = Container(f"{prefix}-{name}", image, *args, **kwargs)
        containers.append(made)
        return made

    try:
        # 1. a wrong --depends URL
        port = free_port()
        args, env = tier_start("prompt-service", port, depends_url=f"http://{LOCAL}:{free_port()}")
        front = container("prompt-bad-depends", port, args, {**env, "PIPELINE_INTERNAL_TOKEN": token}).run()
        live_s = front.wait("/livez", 200)
        time.sleep(2)  # a crash would show by now; the check below also needs the container running
        report.data["containers"][front.name] = {"command": front.shown_command(), "live_s": live_s}
        check_gpu_tier_down(report, "wrong --depends URL", front)
        check_clean_stop(report, front)
        front.remove()

        # 2. LLMService without its model
        port = free_port()
        args, env = tier_start("llm-service", port)
        bare = container("llm-no-model", port, args, {**env, "PIPELINE_INTERNAL_TOKEN": token},
                         extra=["--tmpfs", "/home/bentoml/bento/models"]).run()
        state = bare.wait_exit(READY_TIMEOUT_S)
        logs = bare.logs(200)
        model = manifest("llm-pipeline-config", "ConfigMap")["data"]["PIPELINE_MODEL"]
        message = next((line.strip() for line in logs.splitlines() if model in line and "rror" in line), None)
        report.data["containers"][bare.name] = {"command": bare.shown_command(), "exit_code": state["ExitCode"],
                                                "exited_after_s": round(time.monotonic() - bare.started, 1)}
        report.check("LLMService without a model: exits with an error naming the model",
                     state["ExitCode"] != 0 and message is not None,
                     {"exit_code": state["ExitCode"], "error": message})
        bare.remove()

        # 3. one container per tier
        llm_port, front_port = free_port(), free_port()
        args, env = tier_start("llm-service", llm_port)
        llm = container("llm-service", llm_port, args, {**env, "PIPELINE_INTERNAL_TOKEN": token},
                        extra=["--shm-size", "1g"]).run()
        llm_ready = llm.wait("/readyz", 200)
        args, env = tier_start("prompt-service", front_port, depends_url=llm.url)
        front = container("prompt-service", front_port, args, {**env, "PIPELINE_INTERNAL_TOKEN": token},
                          extra=health_options(front_port)).run()
        front_ready = front.wait("/readyz", 200)
        healthy_s = wait_health(front, "healthy", 60)
        report.check("per tier: Docker's health check (GET /readyz) says healthy", True,
                     {"health_cmd": health_options(front_port)[1], "healthy_after_ready_s": healthy_s})
        report.data["containers"][llm.name] = {"command": llm.shown_command(), "ready_s": llm_ready}
        report.data["containers"][front.name] = {"command": front.shown_command(), "ready_s": front_ready}
        report.check("per tier: both containers ready", True, {"llm_ready_s": llm_ready, "front_ready_s": front_ready})
        per_tier_greedy = check_serves(report, "per tier", front.url)

        stopping = time.monotonic()
        llm_stop = llm.stop()
        report.data["containers"][llm.name]["stop"] = llm_stop
        report.check("per tier: the LLM container stops cleanly", llm_stop["exit_code"] != 137
                     and llm_stop["stop_s"] < STOP_GRACE_S, llm_stop)
        not_ready_s = front.wait("/readyz", 503, timeout_s=60, since=stopping)
        check_gpu_tier_down(report, "per tier, LLM container stopped", front)
        unhealthy_s = wait_health(front, "unhealthy", 60)
        llm.start_again()
        llm_again = llm.wait("/readyz", 200)
        front_again = front.wait("/readyz", 200, timeout_s=120, since=llm.started)
        code, text = readme_curl(front.url, GREEDY)
        follows = {"front_not_ready_after_llm_stop_s": not_ready_s, "docker_unhealthy_after_s": unhealthy_s,
                   "llm_ready_again_s": llm_again,
                   "front_ready_again_s": front_again, "answer": text}
        report.data["containers"][front.name]["follows_llm"] = follows
        report.check("per tier: front /readyz follows the LLM container (down, then back)",
                     code == 200 and text == per_tier_greedy, follows)
        check_clean_stop(report, front)
        check_clean_stop(report, llm)
        for made in (front, llm):
            made.remove()

        # 4. the whole Bento, as `docker run IMAGE` starts it
        port = free_port()
        whole = container("whole-bento", port, [], {**CPU_ENV, "PIPELINE_INTERNAL_TOKEN": token,
                                                    "PORT": str(port), "BENTOML_HOST": LOCAL},
                          extra=["--shm-size", "1g"]).run()
        ready = whole.wait("/readyz", 200)
        report.data["containers"][whole.name] = {"command": whole.shown_command(), "ready_s": ready}
        report.check("whole Bento (bentoml serve): ready", True, {"ready_s": ready})
        whole_greedy = check_serves(report, "whole Bento", whole.url)
        report.check("whole Bento: the same greedy answer as the per-tier containers", whole_greedy == per_tier_greedy,
                     {"whole": whole_greedy, "per_tier": per_tier_greedy})
        check_clean_stop(report, whole)
        whole.remove()
    finally:
        for made in containers:
            made.remove()
        report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report.save()


# --- inspect ------------------------------------------------------------------------------------

# Run inside the image: who runs it, what is installed, which model files it carries.
IN_IMAGE = """
import importlib.metadata as m, json, os, pathlib
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
models = pathlib.Path(os.environ["BENTO_PATH"], "models")
try:  # the engine imports (no GPU needed to import); which CUDA the torch build is for
    import torch, vllm
    imports = {"vllm": vllm.__version__, "torch_cuda": torch.version.cuda}
except Exception as error:
    imports = {"error": repr(error)}
print(json.dumps({"uid": os.getuid(),
                  "versions": {p: version(p) for p in ("bentoml", "vllm", "vllm-cpu", "torch", "transformers")},
                  "model_files": sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file()),
                  "extra_ca_certs": sorted(os.listdir("/usr/local/share/ca-certificates")),
                  "imports": imports}))
"""

def inspect_image(image: str) -> dict:
    info = json.loads(docker("image", "inspect", image))[0]
    config = info["Config"]
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    out = json.loads(docker("run", "--rm", "--network", "none", "--entrypoint", "/app/.venv/bin/python", image,
                            "-c", IN_IMAGE, timeout_s=300))
    uid, versions, model_files = out["uid"], out["versions"], out["model_files"]
    env_names = sorted(item.split("=", 1)[0] for item in config.get("Env") or [])
    leaks = [marker for marker in SECRET_MARKERS if marker in history or any(
        item.startswith(marker) or marker in item for item in config.get("Env") or [])]
    return {
        "image": image, "id": info["Id"], "size_bytes": info["Size"], "size_mb": round(info["Size"] / 1e6),
        "created": info["Created"], "user": config.get("User"), "uid_inside": int(uid),
        "entrypoint": config.get("Entrypoint"), "cmd": config.get("Cmd"),
        "exposed_ports": sorted(config.get("ExposedPorts") or {}), "healthcheck": config.get("Healthcheck"),
        "env_names": env_names, "layers": len(info["RootFS"]["Layers"]),
        "versions": versions,
        "model_files": model_files,
        # The build machine's extra certificate authorities, which the locally made base carries
        # (scripts/container.sh); none on a machine without them.
        "extra_ca_certs": out["extra_ca_certs"],
        "imports": out["imports"],
        "hygiene": {"non_root": int(uid) != 0 and config.get("User") not in (None, "", "root"),
                    "no_secret_in_env_or_history": not leaks, "leaks": leaks,
                    "model_inside": any(name.endswith("model.safetensors") for name in model_files),
                    "engine_imports": "error" not in out["imports"]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "inspect"])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.action == "inspect":
        found = [inspect_image(image) for image in args.images]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(found, indent=1) + "\n")
        for image in found:
            log(f"{image['image']}: {image['id'][:19]} {image['size_mb']} MB, user {image['user']} "
                f"(uid {image['uid_inside']}), {image['versions']}, hygiene {image['hygiene']}")
        return 0 if all(all(v for k, v in image["hygiene"].items() if k != "leaks") for image in found) else 1
    report = Report(args.out, args.images[0])
    try:
        run_checks(args.images[0], report)
    except CheckFailed as failed:
        log(f"stopped at a failed check: {failed}")
        return 1
    log(f"all {len(report.data['checks'])} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
