"""The GPU benchmark phases: a table of named runs (`PHASES`), run one after the other into one
folder, each into RESULTS/<phase>/ with its output in RESULTS/<phase>.log; RESULTS/progress.log
says where it is and RESULTS/DONE marks the end. Needs a GPU host with `pip install -r
requirements.txt` (and vllm-router for the routing phases); `--list` prints the commands.

    python -m bench phases RESULTS llama7b smol tp2 costs [--rounds 3] [--share-gpu]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import ROOT

DEFAULT = ["llama7b", "smol", "tp2", "costs"]
SHARE_UTIL = 0.12  # --share-gpu: vLLM still checks this share of the GPU against what is free at each start
SMOL_KV = 12 << 30  # c=256 x 768 tokens needs ~4.5 GiB on this shape
LLAMA_KV = 26 << 30  # c=64 x ~780 tokens needs ~24.4 GiB (3 servers: ~126 GiB in all)
# routing: the 7B shape holds 512 KiB of KV a token, so 16 prefixes of 2,048 tokens take 16 GiB; under
# 11 GiB a replica holds half the prefixes and its share of the work, and round-robin thrashes
ROUTING_KV, ROUTING_TIGHT_KV = 16 << 30, 11 << 30
# the 1B shape holds 44 KiB of KV a token: 6 GiB holds the mixed workload's 64 prefixes (~147k tokens)
# on one replica; under 1.5 GiB a replica holds about a quarter of them
ROUTING4_KV, ROUTING4_TIGHT_KV = 6 << 30, 3 << 29
SMOL_LOAD = ["--min-prompts", "32", "--prompts-per-concurrency", "4", "--warmup-concurrency", "256"]
UNIT_TESTS = ["tests/unit/test_structured_outputs.py", "tests/unit/gpu/test_sampling_parity.py",
              "tests/unit/front/test_openai_protocol.py", "tests/unit/gpu/test_engine_clients.py",
              "tests/unit/front/test_request_life.py"]


@dataclass(frozen=True)
class Phase:
    argv: list[str]  # after `python`: `-m bench <subcommand> ...`, or another command
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    extra: bool = True  # `--extra` is appended (a bench run that takes the serve-like arguments)


@dataclass(frozen=True)
class Knobs:
    results: Path
    models: Path
    caches: Path
    rounds: int
    devices: list[str]  # one GPU each for the two servers of llama7b and smol; [] takes turns on one
    share_gpu: bool  # the servers of a phase up together on GPU 0, each with a set KV cache
    side_by_side: bool  # routing: both kinds' replicas up at once on GPU 0
    label: str  # the card's name, kept in each run's meta.json
    cpus: int

    def shared(self, kv_bytes: int, servers: int, rounds: bool = False) -> list[str]:
        """The serve arguments that start `servers` together on GPU 0: with --share-gpu, and always
        for a phase of several rounds (its servers take turns, so they are up side by side)."""
        if not (self.share_gpu or rounds and self.rounds > 1):
            return []
        return ["--devices", *["0"] * servers, "--gpu-memory-utilization", str(SHARE_UTIL),
                "--kv-cache-memory-bytes", str(kv_bytes)]


def table(k: Knobs) -> dict[str, Phase]:
    """Every phase's command. These are the runs behind the published figures: change a phase and
    its results are no longer those (give `--extra` for a run of your own)."""
    m, c, r = k.models, k.caches, k.results
    common = ["--load-format", "dummy", "--max-model-len", "4096", "--input-len", "512", "--output-len", "256",
              "--prompt-workers", "8", "--label", k.label, *(["--py-spy"] if shutil.which("py-spy") else [])]
    smol = ["--model", f"{m}/smol", "--served-name", "smol", *common]
    llama = ["--model", f"{m}/llama7b", "--served-name", "llama7b", *common]
    devices = ["--devices", *k.devices] if k.devices else []
    serve = ["-m", "bench", "serve"]
    rounds = ["--rounds", str(k.rounds)]

    def startup(shape: str) -> Phase:
        return Phase(["-m", "bench", "startup", "--model", f"{m}/{shape}", "--served-name", shape, "--load-format",
                      "dummy", "--targets", "pipeline-ec8", "vllm-api8", "--plan", "cold", "warm", "cold", "warm", "cold",
                      "warm", "--first",
                      "0" if shape == "smol" else "1", "--caches", f"{c}/{shape}", "--out", f"{r}/startup_{shape}"],
                     note=f"a new replica's start, {shape} shape: LLMService alone against vllm serve, 3 cold and 3 warm starts each")

    def routing(name: str, kv: int, systems: list[str], workloads: list[str], shape: str = "llama7b",
                replicas: int = 2) -> Phase:
        return Phase(["-m", "bench", "routing", "--model", f"{m}/{shape}", "--served-name", shape, "--load-format",
                      "dummy", "--max-model-len", "10240", "--replicas", str(replicas),
                      *(["--side-by-side"] if k.side_by_side else []), "--gpu-memory-utilization",
                      str(SHARE_UTIL if replicas <= 2 else 0.05), "--kv-cache-memory-bytes", str(kv), "--systems",
                      *systems, "--workloads", *workloads, "--rounds", str(k.rounds), "--caches", f"{c}/routing-{shape}",
                      "--label", k.label, "--out", f"{r}/{name}"],
                     note=f"routing across {replicas} {shape}-shape replicas on GPU 0, {kv / 2**30:g} GiB of KV each: "
                          "the pipeline against vllm-router")

    return {
        "llama7b": Phase([*serve, "--targets", "pipeline", "vllm", *devices, *k.shared(LLAMA_KV, 2), *llama,
                          "--concurrency", "1", "4", "16", "64", "--min-prompts", "10", "--out", f"{r}/llama7b"],
                         note="throughput against vllm serve, Llama-2-7B shape"),
        "smol": Phase([*serve, "--targets", "pipeline", "vllm", *devices, *smol, "--concurrency", "1", "4", "16", "64",
                       "256", *SMOL_LOAD, "--out", f"{r}/smol"], note="throughput against vllm serve, SmolLM2 shape"),
        # eager, and vLLM's symmetric-memory all-reduce off, as the published tp2 figures were measured
        "tp2": Phase([*serve, "--enforce-eager", *llama, "--tensor-parallel-size", "2", "--targets", "pipeline",
                      "--concurrency", "1", "16", "64", "--out", f"{r}/tp2"],
                     env={"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"},
                     note="the pipeline with tensor parallelism over two GPUs"),
        "clients": Phase([*serve, "--targets", "pipeline-ec4", "vllm-api8", "pipeline-ec2", *k.shared(SMOL_KV, 3),
                          *smol, "--concurrency", "64", "256", *SMOL_LOAD, "--out", f"{r}/clients"],
                         note="LLMService over N engine clients against vllm serve --api-server-count N"),
        "pinned2": Phase([*serve, "--targets", "pipeline-ec1", "vllm-api1", "vllm-api2", *k.shared(SMOL_KV, 3, rounds=True),
                          "--pin-gpu-host", "0-1", "--pin-rest", f"2-{k.cpus - 1}", *smol, "--concurrency", "64", "256",
                          *SMOL_LOAD, *rounds, "--caches", f"{c}/smol", "--out", f"{r}/pinned2"],
                         note="the GPU host's processes held to 2 CPUs, the load generators on the others"),
        "pinned4": Phase([*serve, "--targets", "pipeline-ec2", "vllm-api2", "vllm-api4", *k.shared(SMOL_KV, 3),
                          "--pin-gpu-host", "0-3", "--pin-rest", f"4-{k.cpus - 1}", *smol, "--concurrency", "64", "256",
                          *SMOL_LOAD, "--out", f"{r}/pinned4"], note="the GPU host's processes held to 4 CPUs"),
        # the headline's servers, the GPU host's processes on half the CPUs and the rest (PromptService, the
        # load generators) on the other half: the pipeline as a split deployment runs it, its text work off
        # the engine's CPUs, against `vllm serve` holding the same half
        "pinned_half": Phase([*serve, "--targets", "pipeline-ec8", "vllm-api8", *k.shared(SMOL_KV, 2, rounds=True),
                              "--pin-gpu-host", f"0-{k.cpus // 2 - 1}", "--pin-rest", f"{k.cpus // 2}-{k.cpus - 1}",
                              *smol, "--concurrency", "64", "256", *SMOL_LOAD, *rounds, "--caches", f"{c}/smol",
                              "--out", f"{r}/pinned_half"],
                             note="the headline with the GPU host's processes on half the CPUs, PromptService and the "
                                  "load generators on the other half, as alternating rounds"),
        "features": Phase(["scripts/gpu_feature_check.py", "--model", f"{m}/smol", "--out", f"{r}/features/features.json"],
                          note="structured outputs, tool calling and several engine clients on this vLLM", extra=False),
        "unit": Phase(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", f"{r}/unit/junit.xml", *UNIT_TESTS],
                      env={"PIPELINE_MODEL": f"{m}/smol"}, note="the unit tests that exercise this vLLM's own parts",
                      extra=False),
        "startup_smol": startup("smol"),
        "startup_llama7b": startup("llama7b"),
        "ttft1": Phase([*serve, "--targets", "pipeline-ec8", "vllm-api8", *k.shared(LLAMA_KV, 2, rounds=True), *llama,
                        "--concurrency", "1", "--min-prompts", "10", *rounds, "--caches", f"{c}/llama7b",
                        "--out", f"{r}/ttft1"], note="the first token at c=1, Llama-2-7B shape, rounds alternating"),
        "repeats": Phase([*serve, "--targets", "pipeline-ec8", "vllm-api8", "pipeline-ec8-kvevents",
                          *k.shared(SMOL_KV, 3, rounds=True), *smol, "--concurrency", "64", "256", *SMOL_LOAD, *rounds,
                          "--caches", f"{c}/smol", "--out", f"{r}/repeats"],
                         note="the headline, as alternating rounds: the pipeline against vllm serve --api-server-count 8, "
                              "and the pipeline with KV cache events on"),
        "spread": Phase([*serve, "--targets", "pipeline-ec8", "pipeline-ec8-keepalive", "vllm-api8",
                         *k.shared(SMOL_KV, 3, rounds=True), *smol, "--concurrency", "64", "256", *SMOL_LOAD, *rounds,
                         "--caches", f"{c}/smol", "--out", f"{r}/spread"],
                        note="the connection spread's effect, as alternating rounds: the pipeline with it (the default) "
                             "and without (PIPELINE_SPREAD_CONNECTIONS=false), against vllm serve --api-server-count 8"),
        "routing": routing("routing", ROUTING_KV, ["pipeline-kv", "pipeline-rr", "pipeline-kv-2fronts",
                                                   "router-cache_aware", "router-round_robin"],
                           ["prefix:32", "prefix:64", "mixed:32", "multiturn:16", "random:64"]),
        "routing_tight": routing("routing_tight", ROUTING_TIGHT_KV, ["pipeline-kv", "pipeline-rr", "router-cache_aware",
                                                                     "router-round_robin"], ["prefix:32", "mixed:32", "multiturn:16"]),
        # four replicas of a 1B shape on one GPU: routing, not prefill, is what differs
        "routing4": routing("routing4", ROUTING4_KV, ["pipeline-kv", "pipeline-kv-2fronts", "router-cache_aware",
                                                      "router-round_robin"],
                            ["prefix:64", "mixed:64", "multiturn:32", "random:128"], shape="llama1b", replicas=4),
        "routing4_tight": routing("routing4_tight", ROUTING4_TIGHT_KV, ["pipeline-kv", "router-cache_aware",
                                                                        "router-round_robin"],
                                  ["prefix:64", "mixed:64"], shape="llama1b", replicas=4),
        "costs": Phase(["-m", "bench", "costs", "--parts", "cpu-tier", "--model", f"{m}/smol", "--out", f"{r}/costs"],
                       note="the CPU tier's own costs per core on this machine's processor", extra=False),
    }


# --- the command ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", type=Path, nargs="?", help="the folder of the phases' results")
    parser.add_argument("phases", nargs="*", help=f"phases to run, in order (default: {' '.join(DEFAULT)}); "
                        "--list names them all")
    parser.add_argument("--list", action="store_true", help="print each phase's command and do nothing")
    parser.add_argument("--models", type=Path, default=Path("/tmp/models"), help="the phases' model folders "
                        "(MODELS/smol, MODELS/llama7b: made from --model-src when missing)")
    parser.add_argument("--model-src", type=Path, help="config and tokenizer files for them (default: the "
                        "pipeline's configured model)")
    parser.add_argument("--caches", type=Path, default=Path("/tmp/caches"), help="compile caches, kept between phases")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the phases that alternate servers")
    parser.add_argument("--devices", nargs="*", help="llama7b and smol: one GPU per server (default: 0 1 where there "
                        "are two GPUs; none: the servers take turns on one)")
    parser.add_argument("--share-gpu", action="store_true", help="a phase's servers start together on GPU 0, each "
                        "with a set KV cache, and are measured one at a time")
    parser.add_argument("--side-by-side", action=argparse.BooleanOptionalAction, help="routing: both kinds' replicas "
                        "at once on GPU 0 (default: where the GPU has 130 GB or more)")
    parser.add_argument("--extra", default="", help="arguments appended to every `bench` run, e.g. a CPU dry run's "
                        "\"--cpu --concurrency 1 --output-len 8\" (a later value of an option wins)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.results is None and not args.list:
        parser.error("the results folder is needed")


def knobs(args: argparse.Namespace) -> Knobs:
    gpus = nvidia_smi("name")
    memory_mib = int((nvidia_smi("memory.total", "nounits") or ["0"])[0])
    devices = args.devices if args.devices is not None else (["0", "1"] if len(gpus) >= 2 else [])
    side_by_side = args.side_by_side if args.side_by_side is not None else memory_mib >= 130000
    return Knobs(results=(args.results or Path("RESULTS")).resolve(), models=args.models.resolve(), caches=args.caches.resolve(),
                 rounds=args.rounds, devices=devices, share_gpu=args.share_gpu, side_by_side=side_by_side,
                 label=gpus[0] if gpus else "", cpus=os.cpu_count() or 1)


def run(args: argparse.Namespace) -> int:
    k = knobs(args)
    phases = table(k)
    chosen = args.phases or DEFAULT
    if unknown := [name for name in chosen if name not in phases]:
        raise SystemExit(f"unknown phase(s) {unknown}: {' '.join(phases)}")
    extra = shlex.split(args.extra)
    commands = {name: command(phases[name], extra) for name in chosen}
    if args.list:
        for name in (args.phases or phases):
            phase = phases[name]
            env = " ".join(f"{key}={value}" for key, value in phase.env.items())
            print(f"# {name}: {phase.note}\n{env + ' ' if env else ''}python {shlex.join(command(phase, extra))}\n")
        return 0
    results = k.results
    results.mkdir(parents=True, exist_ok=True)
    make_models(k.models, args.model_src)
    (results / "nvidia-smi.txt").write_text(capture(["nvidia-smi"]))
    (results / "lscpu.txt").write_text(capture(["lscpu"]))
    monitor = start_gpu_monitor(results / "gpu-util.txt")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # the models are local folders: no hub look-ups, no usage reports
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "BENTOML_DO_NOT_TRACK": "true"}
    running: list[subprocess.Popen] = []

    def stop(*_) -> None:  # pass it on to the phase, whose bench run stops its servers
        progress(results, "stopped by a signal")
        for child in running:
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            child.wait()
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for name in chosen:
            progress(results, f"phase {name} starts")
            log = results / f"{name}.log"
            with log.open("w") as out:
                child = subprocess.Popen([sys.executable, *commands[name]], cwd=ROOT, env={**env, **phases[name].env},
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
                running.append(child)
                code = child.wait()
                running.remove(child)
            levels = sum(" ok, " in line for line in log.read_text(errors="replace").splitlines())
            progress(results, f"phase {name} ends, rc {code}: {levels} load levels measured")
    finally:
        if monitor is not None:
            monitor.terminate()
    progress(results, "all done")
    (results / "DONE").touch()
    return 0


def command(phase: Phase, extra: list[str]) -> list[str]:
    """The phase's argv after `python`, `extra` appended to a bench run."""
    return [*phase.argv, *extra] if phase.extra and phase.argv[:2] == ["-m", "bench"] else phase.argv


def progress(results: Path, message: str) -> None:
    line = f"{time.strftime('%H:%M:%S', time.gmtime())} {message}"
    print(line, flush=True)
    with (results / "progress.log").open("a") as file:
        file.write(line + "\n")


def make_models(models: Path, source: Path | None) -> None:
    from bench.models import SHAPES, default_source, make_model

    for shape in SHAPES:
        if not (models / shape / "config.json").exists():
            make_model(source or default_source(), models / shape, shape)


def nvidia_smi(query: str, *formats: str) -> list[str]:
    text = capture(["nvidia-smi", f"--query-gpu={query}", f"--format=csv,noheader{''.join(',' + f for f in formats)}"])
    return [line.strip() for line in text.splitlines() if line.strip()]


def capture(argv: list[str]) -> str:
    """What `argv` prints, or nothing where it fails or is missing (no GPU: no nvidia-smi)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def start_gpu_monitor(path: Path) -> subprocess.Popen | None:
    """The GPUs' use every 2 s while the phases run (`nvidia-smi dmon`), where there are GPUs."""
    if not shutil.which("nvidia-smi"):
        return None
    return subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "2"], stdout=path.open("w"), stderr=subprocess.STDOUT)
