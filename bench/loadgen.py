"""Drive a server with vLLM's own load generator, `vllm bench serve`, and keep every request's figures.

One load level (a concurrency) may be split over several load-generator processes, each with its
share of the concurrency and prompts and its own seed, started together (BENCH_START_FILE, see
harness/vllm_cli.py), so that the generator is never the limit. While they run, the CPU use of each
generator process and of every server process is sampled, so the report can show that the
generator had headroom and where the server spent its CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from bench.datasets import Workload
from harness import ROOT


def bench_argv(
    base_url: str, served_name: str, tokenizer: str, workload: Workload, part: int, result_file: Path
) -> list[str]:
    share = lambda total: total // workload.clients + (1 if part < total % workload.clients else 0)  # noqa: E731
    return [
        sys.executable, "-m", "harness.vllm_cli", "bench", "serve",
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
        "--model", served_name, "--tokenizer", tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(workload.input_len), "--random-output-len", str(workload.output_len),
        "--ignore-eos", "--temperature", "0",
        "--num-prompts", str(share(workload.num_prompts)),
        "--max-concurrency", str(share(workload.concurrency)),
        "--seed", str(workload.seed + part),
        "--num-warmups", "0", "--ready-check-timeout-sec", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--save-detailed", "--disable-tqdm",
        "--result-dir", str(result_file.parent), "--result-filename", result_file.name,
    ]  # fmt: skip


class CpuSampler(threading.Thread):
    """Samples the CPU use (% of one core) of given processes every `interval_s`."""

    def __init__(self, groups: dict[str, list[int]], interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []  # (monotonic time, label -> %)
        self._processes: dict[str, psutil.Process] = {}
        for group, pids in groups.items():
            for pid in pids:
                try:
                    process = psutil.Process(pid)
                    self._processes[f"{group}:{process_label(process)}:{pid}"] = process
                    process.cpu_percent(None)
                except psutil.Error:
                    pass
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            now, sample = time.monotonic(), {}
            for label, process in self._processes.items():
                try:
                    sample[label] = process.cpu_percent(None)
                except psutil.Error:
                    pass
            self.samples.append((now, sample))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def summary(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Mean and peak % of one core per process, over samples taken inside [start, end]."""
        window = [sample for t, sample in self.samples if start + self.interval_s <= t <= end]
        labels = sorted({label for sample in window for label in sample})
        out = {}
        for label in labels:
            values = [sample[label] for sample in window if label in sample]
            out[label] = {"mean": round(sum(values) / len(values), 1), "max": round(max(values), 1)}
        return out


def process_label(process: psutil.Process) -> str:
    """What a process is: a BentoML worker (`service#worker`), the load generator, vLLM's API server, ..."""
    name = process.name()
    cmdline = process.cmdline()
    if "--service-name" in cmdline:
        service = cmdline[cmdline.index("--service-name") + 1]
        worker = cmdline[cmdline.index("--worker-id") + 1] if "--worker-id" in cmdline else "?"
        return f"{service}#{worker}"
    if "harness.vllm_cli" in cmdline:  # vLLM's CLI: the load generator, or `vllm serve --api-server-count N`
        command = cmdline[cmdline.index("harness.vllm_cli") + 1:]
        return "vllm-bench-serve" if command[:1] == ["bench"] else "vllm-serve"
    if "vllm.entrypoints.openai.api_server" in cmdline:
        return "vllm-api-server"
    if "bentoml" in cmdline and "serve" in cmdline:
        return "bentoml-serve"
    return name.replace(":", "_")


def run_load(
    base_url: str,
    served_name: str,
    tokenizer: str,
    workload: Workload,
    out_dir: Path,
    server_pids: list[int],
    timeout_s: float = 3600,
) -> dict:
    """Run one load level; returns the merged record (per-request figures, CPU use, errors)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"c{workload.concurrency}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start_file = out_dir / f"{stem}.start"
    for stale in out_dir.glob(f"{stem}.start*"):
        stale.unlink()
    env["BENCH_START_FILE"] = str(start_file)
    clients, results, logs = [], [], []
    for part in range(workload.clients):
        result = out_dir / f"{stem}-part{part}.json"
        result.unlink(missing_ok=True)
        log = (out_dir / f"{stem}-part{part}.log").open("w")
        argv = bench_argv(base_url, served_name, tokenizer, workload, part, result)
        clients.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        results.append(result)
        logs.append(log)
    sampler = CpuSampler({"loadgen": [c.pid for c in clients], "server": server_pids})
    sampler.start()
    try:
        deadline = time.monotonic() + 600
        while len(list(out_dir.glob(f"{stem}.start.ready.*"))) < len(clients):
            if time.monotonic() > deadline or any(c.poll() is not None for c in clients):
                break  # a client died (its log says why) or never got ready: fall through
            time.sleep(0.05)
        start_file.touch()
        for client in clients:
            client.wait(timeout=timeout_s)
    finally:
        sampler.stop()
        for client, log in zip(clients, logs):
            if client.poll() is None:
                client.kill()
                client.wait()
            log.close()
    failed = [i for i, c in enumerate(clients) if c.returncode != 0 or not results[i].exists()]
    if failed:
        tail = (out_dir / f"{stem}-part{failed[0]}.log").read_text()[-3000:]
        raise RuntimeError(f"load generator part {failed[0]} failed (rc {clients[failed[0]].returncode}):\n{tail}")
    record = merge([json.loads(r.read_text()) for r in results], workload)
    start, end = record.pop("_window")
    record["cpu"] = sampler.summary(start, end)
    for r in results:
        r.unlink()
    return record


def merge(parts: list[dict], workload: Workload) -> dict:
    """One record from the result files of the load generator's processes."""
    requests = {"start_s": [], "ttft_s": [], "latency_s": [], "prompt_len": [], "output_len": [], "itl_s": [], "error": []}
    summaries = []
    for part in parts:
        n = len(part["ttfts"])
        requests["start_s"] += part["start_times"]
        requests["ttft_s"] += part["ttfts"]
        # vLLM 0.26 saves no per-request latency: the last chunk's time is the first's plus the gaps
        requests["latency_s"] += part.get("latencies") or [t + sum(i) for t, i in zip(part["ttfts"], part["itls"])]
        requests["prompt_len"] += part["input_lens"]
        requests["output_len"] += part["output_lens"]
        requests["itl_s"] += [[round(x, 6) for x in itl] for itl in part["itls"]]
        requests["error"] += part["errors"]
        assert all(len(v) == len(requests["start_s"]) for v in requests.values()), "ragged result file"
        summaries.append({k: v for k, v in part.items() if not isinstance(v, list)} | {"requests": n})
    starts = requests["start_s"]
    ends = [s + l for s, l in zip(starts, requests["latency_s"])]
    first_starts = [min(part["start_times"]) for part in parts if part["start_times"]]
    origin = min(starts)
    requests["start_s"] = [round(s - origin, 6) for s in starts]
    return {
        "workload": asdict(workload),
        "duration_s": max(ends) - origin,
        "start_skew_s": max(first_starts) - min(first_starts),
        "requests": requests,
        "vllm_summaries": summaries,
        "_window": (origin, max(ends)),
    }
