"""Run the pipeline's CPU container image as a user would, and write down what happened.

    python scripts/container_check.py inspect IMAGE [IMAGE...] --out bench/results/DATE-container-cpu/image-NAME.json
    python scripts/container_check.py run IMAGE --out bench/results/DATE-container-cpu/check-cpu.json   # starts engines:
                                                                       # run it under the engine lock
    python scripts/container_check.py build-failure LOG [--trust-host-cas]   # one line, if LOG is a
                                                                       # build that failed on a certificate

`inspect`: each image's id, size, user, entry point, ports, environment names, the model files it
carries and its Python packages, and the hygiene checks (non-root, no token or key in the
environment or the build history, the model inside, the engine imports).

`run`, in this order (every wait has a deadline; each container is removed afterwards):
1. PromptService alone, its replica list and `--depends` URL where nothing listens: it must stay
   up, /livez 200, /readyz 503, and /generate 503 with Retry-After (the GPU tier down, no crash);
2. LLMService with its model store empty (a tmpfs over the image's models/): it must exit, not
   serve, with an error that names the missing model;
3. two LLMService containers and one PromptService container, as deploy/kubernetes/ runs them
   (the manifests' container arguments and environment, the ConfigMap's settings, one shared
   PIPELINE_INTERNAL_TOKEN; only the host becomes 127.0.0.1 and the port a free one, and the
   front's PIPELINE_GPU_TIER_REPLICAS, a headless Service's `dns://` name in the cluster, becomes
   the list of both replicas' URLs): the README's curl, the OpenAI client (models, chat, a
   stream), Docker's health check on the front (`--health-cmd`: GET /readyz) healthy; distinct
   prompts reach both replicas (the front's per-replica counters and each engine's own); one
   replica stopped: the front stays ready and answers from the other; both stopped: front /readyz
   503, /generate 503 with Retry-After, /livez 200, Docker health unhealthy; one started again:
   front ready and answering again; every container stops cleanly (`docker stop`: exit before the
   grace period, not killed);
4. the whole Bento in one container, as `docker run IMAGE` starts it (`bentoml serve`, both tiers),
   with PORT and BENTOML_HOST set: the README's curl and the OpenAI client, a clean stop.

Every container uses the host's network (`--network host`) and binds 127.0.0.1 only: the tiers talk
over loopback, and nothing else is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
README_PROMPT = "What is the capital of France?"
LOCAL = "127.0.0.1"
READY_TIMEOUT_S = 900.0  # an engine start on this shared 2-core machine: 1 to 5 minutes
STOP_GRACE_S = 60  # the manifests' terminationGracePeriodSeconds
# What a CPU machine needs on top of the manifests' settings (as harness/tiers.py's tier_env): a
# small KV cache and context, one front worker, and two engine clients per replica (the manifest's
# three are sized for the four CPUs its pod requests; here two replicas share two cores).
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "PIPELINE_MAX_MODEL_LEN": "2048", "PIPELINE_PROMPT_WORKERS": "1",
           "PIPELINE_ENGINE_CLIENTS": "2"}
REPLICAS_ENV = "PIPELINE_GPU_TIER_REPLICAS"
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


def tier_start(deployment: str, port: int, depends_url: str | None = None,
               replicas: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The Deployment's container arguments (host 127.0.0.1, this port, this --depends URL) and
    its environment: the ConfigMap's data, the container's plain `value` entries, CPU_ENV, and
    `replicas` as the front's PIPELINE_GPU_TIER_REPLICAS (in place of the manifest's discovery
    source, a cluster's DNS name)."""
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
    if replicas is not None:
        env[REPLICAS_ENV] = replica_list(replicas)
    return args, env


def replica_list(urls: list[str]) -> str:
    """PIPELINE_GPU_TIER_REPLICAS for these replicas: their URLs, comma-separated (a fixed list)."""
    if not urls:
        raise ValueError("a replica list needs at least one URL")
    return ",".join(urls)


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

    def logs(self, tail: int = 60, timestamps: bool = False) -> str:
        result = subprocess.run(["docker", "logs", *(["--timestamps"] if timestamps else []), "--tail", str(tail),
                                 self.name], capture_output=True,
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
    clean = stopped["exit_code"] != 137 and stopped["stop_s"] < STOP_GRACE_S and not stopped["oom_killed"]
    if not clean:  # what it was doing when it did not stop
        stopped["log_tail"] = container.logs(40, timestamps=True).splitlines()
    report.check(f"{container.name}: stops cleanly on SIGTERM", clean, stopped)


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


def status_of(url: str, timeout_s: float = 10) -> int | None:
    """GET url's status, or None when it does not answer in time."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code
    except httpx.HTTPError:
        return None


def check_gpu_tier_down(report: Report, name: str, front: Container) -> None:
    with httpx.Client(base_url=front.url, timeout=30) as http:
        ready, live = http.get("/readyz"), http.get("/livez")
        generate = http.post("/generate", json={"prompt": README_PROMPT, "max_tokens": 5})
    detail = {"readyz": ready.status_code, "livez": live.status_code, "generate": generate.status_code,
              "retry_after": generate.headers.get("retry-after"), "body": generate.text[:300]}
    report.check(f"{name}: GPU tier reported down (503 + Retry-After, not ready, still live)",
                 ready.status_code == 503 and live.status_code == 200 and generate.status_code == 503
                 and generate.headers.get("retry-after") is not None and front.state()["Running"], detail)


# --- where requests went -------------------------------------------------------------------------

def metric_sums(url: str, name: str, label: str | None = None) -> dict[str, float]:
    """The samples of `name` on the /metrics at `url`, summed by the value of `label` (or all
    under ""). A replica's /metrics is open; the front's sums its workers."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).raise_for_status().text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get(label, "") if label else ""
                sums[key] = sums.get(key, 0.0) + sample.value
    return sums


def routed(front: Container, replicas: list[Container]) -> dict[str, dict[str, float]]:
    """Per replica (host:port): the requests the front routed there, and those its engine finished."""
    believed = metric_sums(front.url, "pipeline_replica_requests_total", "replica")
    return {replica.url.removeprefix("http://"): {
                "front_routed": believed.get(replica.url.removeprefix("http://"), 0.0),
                "engine_finished": sum(metric_sums(replica.url, "vllm:request_success_total").values())}
            for replica in replicas}


def moved_since(front: Container, replicas: list[Container], before: dict[str, dict[str, float]],
                enough: Callable[[dict[str, dict[str, float]]], bool], within_s: float = 15) -> dict[str, dict[str, float]]:
    """How far each replica's counters moved since `before`, once `enough` says so or the deadline
    passes (an engine counts a request when its last output is processed, a moment after the answer)."""
    deadline = time.monotonic() + within_s
    while True:
        after = routed(front, replicas)
        moved = {name: {key: after[name][key] - before[name][key] for key in counts} for name, counts in after.items()}
        if enough(moved) or time.monotonic() > deadline:
            return moved
        time.sleep(0.5)


def check_routes_to_both(report: Report, front: Container, replicas: list[Container], prompts: int = 16) -> None:
    """Distinct prompts (nothing shared, so each has its own home replica under `kv` routing),
    four at a time: both replicas' engines finish some, as the front's counters say."""
    before = routed(front, replicas)

    def generate(number: int) -> int:
        body = {"prompt": f"Story {number}: tell me about the number {number * 7919} in one line.", "max_tokens": 8,
                "temperature": 0}
        with httpx.Client(base_url=front.url, timeout=120) as http:
            return http.post("/generate", json=body).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(generate, range(prompts)))
    moved = moved_since(front, replicas, before,
                        lambda moved: sum(counts["engine_finished"] for counts in moved.values()) >= prompts)
    report.data["routed"] = moved
    report.check(f"two replicas: {prompts} distinct prompts reach both (the front's counters and each engine's)",
                 statuses == [200] * prompts
                 and all(counts["front_routed"] >= 1 and counts["engine_finished"] >= 1 for counts in moved.values())
                 and sum(counts["front_routed"] for counts in moved.values()) == prompts,
                 {"statuses": sorted(set(statuses)), "per_replica": moved})


def run_checks(image: str, report: Report) -> None:
    token = secrets.token_hex(16)  # one PIPELINE_INTERNAL_TOKEN for both tiers of a deployment
    prefix = f"llmp-check-{os.getpid()}"
    containers: list[Container] = []

    def container(name: str, *args, **kwargs) -> Container:
        made = Container(f"{prefix}-{name}", image, *args, **kwargs)
        containers.append(made)
        return made

    try:
        # 1. no GPU replica where the front is told to look
        port, nowhere = free_port(), f"http://{LOCAL}:{free_port()}"
        args, env = tier_start("prompt-service", port, depends_url=nowhere, replicas=[nowhere])
        front = container("prompt-no-replica", port, args, {**env, "PIPELINE_INTERNAL_TOKEN": token}).run()
        live_s = front.wait("/livez", 200)
        time.sleep(2)  # a crash would show by now; the check below also needs the container running
        report.data["containers"][front.name] = {"command": front.shown_command(), "live_s": live_s}
        check_gpu_tier_down(report, "no replica answers", front)
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

        # 3. two GPU-tier replicas behind one front, as the manifests run them
        replicas = []
        for name in ("a", "b"):
            port = free_port()
            args, env = tier_start("llm-service", port)
            replicas.append(container(f"llm-service-{name}", port, args, {**env, "PIPELINE_INTERNAL_TOKEN": token},
                                      extra=["--shm-size", "1g"]).run())
        replicas_ready = {replica.name: replica.wait("/readyz", 200) for replica in replicas}
        # `leaving` stops first; `staying` stops last and starts again. The front's --depends URL
        # (in the cluster, the Service over every ready pod) names `staying`: with the replica
        # list set, requests and readiness use the list, and that URL answers whenever a replica does.
        leaving, staying = replicas
        front_port = free_port()
        args, env = tier_start("prompt-service", front_port, depends_url=staying.url,
                               replicas=[replica.url for replica in replicas])
        front = container("prompt-service", front_port, args, {**env, "PIPELINE_INTERNAL_TOKEN": token},
                          extra=health_options(front_port)).run()
        front_ready = front.wait("/readyz", 200)
        healthy_s = wait_health(front, "healthy", 60)
        report.check("two replicas: Docker's health check on the front (GET /readyz) says healthy", True,
                     {"health_cmd": health_options(front_port)[1], "healthy_after_ready_s": healthy_s})
        for replica in replicas:
            report.data["containers"][replica.name] = {"command": replica.shown_command(),
                                                       "ready_s": replicas_ready[replica.name]}
        report.data["containers"][front.name] = {"command": front.shown_command(), "ready_s": front_ready}
        report.check("two replicas: both LLM containers and the front ready", True,
                     {"llm_ready_s": replicas_ready, "front_ready_s": front_ready,
                      REPLICAS_ENV: env[REPLICAS_ENV], "routing": env.get("PIPELINE_ROUTING")})
        greedy = check_serves(report, "two replicas", front.url)
        check_routes_to_both(report, front, replicas)

        # one replica stops: the front stays ready and the other answers
        check_clean_stop(report, leaving)
        before = routed(front, [staying])
        code, text = readme_curl(front.url, GREEDY)
        ready = status_of(f"{front.url}/readyz")
        served = moved_since(front, [staying], before, lambda moved: all(
            counts["engine_finished"] >= 1 for counts in moved.values()))
        report.check("two replicas, one stopped: the front stays ready and the other replica answers",
                     code == 200 and text == greedy and ready == 200
                     and all(counts["engine_finished"] == 1 for counts in served.values()),
                     {"status": code, "readyz": ready, "answer": text, "the_other": served})

        # both stop: the front is not ready, and says so; one starts again: the front follows
        stopping = time.monotonic()
        check_clean_stop(report, staying)
        not_ready_s = front.wait("/readyz", 503, timeout_s=60, since=stopping)
        check_gpu_tier_down(report, "two replicas, both stopped", front)
        unhealthy_s = wait_health(front, "unhealthy", 60)
        staying.start_again()
        llm_again = staying.wait("/readyz", 200)
        front_again = front.wait("/readyz", 200, timeout_s=120, since=staying.started)
        code, text = readme_curl(front.url, GREEDY)
        follows = {"front_not_ready_after_last_stop_s": not_ready_s, "docker_unhealthy_after_s": unhealthy_s,
                   "llm_ready_again_s": llm_again, "front_ready_again_s": front_again, "answer": text}
        report.data["containers"][front.name]["follows_replicas"] = follows
        report.check("two replicas: front /readyz follows them (both down, then one back)",
                     code == 200 and text == greedy, follows)
        check_clean_stop(report, front)
        check_clean_stop(report, staying)
        for made in (front, *replicas):
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
        report.check("whole Bento: the same greedy answer as the per-tier containers", whole_greedy == greedy,
                     {"whole": whole_greedy, "per_tier": greedy})
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


# --- a build that failed -------------------------------------------------------------------------

# What pip, uv, curl and apt print when a server's certificate is not trusted: behind a
# TLS-inspecting proxy, the build cannot reach the package index with the base image's trust store.
CERTIFICATE_ERROR = re.compile(
    r"(certificate verify failed|invalid peer certificate|SSL certificate problem|Certificate verification failed)"
    r"[^'\")(\n]*", re.IGNORECASE)


def certificate_failure(log: str) -> str | None:
    """What the build log says about an untrusted certificate (its first such message), or None."""
    found = CERTIFICATE_ERROR.search(log)
    return found.group(0).strip(" :;,.") if found else None


def build_failure_line(log: str, log_name: str, host_cas: bool) -> str | None:
    """One line for a build that failed on a certificate, naming --trust-host-cas; None otherwise."""
    reason = certificate_failure(log)
    if reason is None:
        return None
    if host_cas:
        return (f"the image build failed on a TLS certificate ({reason}) even with --trust-host-cas: the CA that "
                f"signs it is not among /usr/local/share/ca-certificates/*.crt (log: {log_name})")
    return (f"the image build failed on a TLS certificate ({reason}): behind a TLS-inspecting proxy, run again "
            f"with --trust-host-cas (log: {log_name})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "inspect", "build-failure"])
    parser.add_argument("images", nargs="+", help="the images (run, inspect) or the build's log (build-failure)")
    parser.add_argument("--out", type=Path, help="the report (run, inspect)")
    parser.add_argument("--trust-host-cas", action="store_true", help="build-failure: the build had the host's CAs")
    args = parser.parse_args()
    if args.action == "build-failure":  # exit 0 with the line when the build failed on a certificate
        log_path = Path(args.images[0])
        line = build_failure_line(log_path.read_text(errors="replace"), args.images[0], args.trust_host_cas)
        if line:
            print(line)
        return 0 if line else 1
    if args.out is None:
        parser.error(f"{args.action} needs --out")
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
