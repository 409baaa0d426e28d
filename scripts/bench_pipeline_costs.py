"""The pipeline's own costs, each measured alone (issue 5): what the split adds around the engine.

    python scripts/bench_pipeline_costs.py --out docs/benchmarks/pipeline-costs.json [--model DIR]

1. CPU tier, per core (one thread, in-process, per second of CPU time): chat template + tokenization, requests/s, for a
   short and a long prompt; incremental detokenization (services/front/text/detokenizer.py), tokens/s,
   one token per push and 8 per push, with and without a stop string; the tier contract's frame
   encoding (GPU tier) and decoding (CPU tier), frames/s.
2. Round trips (with --serve): the two tiers under `bentoml serve`, then
   - LLMService /model_info, called directly on its socket (the bare hop, no engine work),
   - LLMService /generate, 1 token, directly (hop + engine),
   - PromptService /generate, 1 token (client -> CPU tier -> GPU tier -> back: the full path),
   each sequentially, median and p90 of N calls. The difference between the last two is what the
   CPU tier adds to a request's first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LONG_TEXT = (
    "The history of superconductivity begins in 1911, when Heike Kamerlingh Onnes cooled mercury with "
    "liquid helium and watched its electrical resistance vanish below about four kelvin. For decades "
    "nobody could explain why. The answer came in 1957 from Bardeen, Cooper and Schrieffer: electrons "
    "pair up through vibrations of the crystal lattice, and the pairs move together without scattering. "
)


def per_second(fn, *, seconds: float = 2.0) -> float:
    """Calls of fn per second of this process's CPU time, after one warm-up call.

    CPU time, not wall time: on a shared machine other processes take turns on the cores, and
    what is asked is the throughput of one core. Everything measured here runs on one thread.
    """
    fn()
    n, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def cpu_tier_costs(model_path: str) -> dict:
    from services.front.text.detokenizer import IncrementalDetokenizer
    from services.front.text.templates import ChatFormatter, load_chat_template
    from services.front.text.tokenizer import encode, load_tokenizer
    from services.protocol import DeltaDecoder, GenerateDelta, encode_frame

    tokenizer = load_tokenizer(model_path)
    formatter = ChatFormatter(tokenizer, load_chat_template("model", tokenizer.chat_template))
    prompts = {"short": "What is the capital of France?", "long": LONG_TEXT * 6}
    out: dict = {"template_tokenize": {}, "detokenize": {}, "frames": {}}
    for name, text in prompts.items():
        messages = [{"role": "user", "content": text}]
        ids = encode(tokenizer, formatter.render(messages), add_special_tokens=False)
        rate = per_second(lambda: encode(tokenizer, formatter.render(messages), add_special_tokens=False))
        template_only = per_second(lambda: formatter.render(messages))
        out["template_tokenize"][name] = {
            "prompt_tokens": len(ids),
            "requests_per_s": round(rate, 1),
            "template_only_requests_per_s": round(template_only, 1),
            "ms_per_request": round(1000 / rate, 3),
        }

    ids = tokenizer.encode(LONG_TEXT * 8, add_special_tokens=False)  # real text: realistic merges
    backend = tokenizer.backend_tokenizer
    for label, step, stop in (
        ("1_per_push", 1, ()),
        ("8_per_push", 8, ()),
        ("1_per_push_with_stop_string", 1, ("</answer>",)),
    ):
        def decode_all() -> None:
            d = IncrementalDetokenizer(backend, stop=stop)
            for i in range(0, len(ids), step):
                d.push(ids[i : i + step])
            d.finish()

        rate = per_second(decode_all)
        out["detokenize"][label] = {"tokens_per_s": round(rate * len(ids)), "sequence_tokens": len(ids)}

    frame = encode_frame(GenerateDelta(token_ids=[1234], prompt_tokens=512, completion_tokens=17))
    frames = frame * 64
    out["frames"] = {
        "frame_bytes": len(frame),
        "encode_per_s": round(per_second(lambda: encode_frame(GenerateDelta(token_ids=[1234], prompt_tokens=512, completion_tokens=17)))),
        "decode_per_s": round(per_second(lambda: DeltaDecoder().feed(frames)) * 64),
    }
    return out


def _stats(samples_s: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def round_trips(server, token_ids: list[int], n: int) -> dict:
    import httpx

    body = {"request": {"request_id": "x", "token_ids": token_ids, "sampling_params": {"max_tokens": 1, "ignore_eos": True}}}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client, httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=server.llm_socket()), base_url="http://llm",
        headers=server.internal_headers, timeout=30,
    ) as llm:

        async def timed(call) -> list[float]:
            samples = []
            for i in range(n + 5):
                start = time.perf_counter()
                await call(i)
                if i >= 5:  # warm-up calls are not counted
                    samples.append(time.perf_counter() - start)
            return samples

        async def model_info(i: int) -> None:
            (await llm.post("/model_info", json={})).raise_for_status()

        async def llm_generate(i: int) -> None:
            body["request"]["request_id"] = f"rt-{i}-{time.time_ns()}"
            async with llm.stream("POST", "/generate", json=body) as r:
                r.raise_for_status()
                await r.aread()

        async def front_generate(i: int) -> None:
            payload = {"tokens": token_ids, "max_tokens": 1, "ignore_eos": True}
            async with client.stream("POST", "/generate", json=payload) as r:
                r.raise_for_status()
                await r.aread()

        async def front_chat(i: int) -> None:
            payload = {"prompt": "What is the capital of France?", "max_tokens": 1, "ignore_eos": True}
            async with client.stream("POST", "/generate", json=payload) as r:
                r.raise_for_status()
                await r.aread()

        return {
            "llm_model_info_direct": _stats(await timed(model_info)),
            "llm_generate_1_token_direct": _stats(await timed(llm_generate)),
            "pipeline_generate_1_token_token_ids": _stats(await timed(front_generate)),
            "pipeline_generate_1_token_chat_prompt": _stats(await timed(front_chat)),
        }


def serve_and_measure(model: str, load_format: str, port: int, n: int, log: Path, extra_env: dict[str, str]) -> dict:
    from harness import serve_pipeline

    env = {
        "PIPELINE_MODEL": model,
        "PIPELINE_LOAD_FORMAT": load_format,
        "PIPELINE_PROMPT_WORKERS": "1",
        "PIPELINE_MAX_MODEL_LEN": "2048",
        **extra_env,
    }
    server = serve_pipeline(log=log, env=env, port=port, ready_timeout_s=600)
    try:
        from services.front.text.tokenizer import encode, load_tokenizer

        token_ids = encode(load_tokenizer(model), "What is the capital of France?", add_special_tokens=False)
        return asyncio.run(round_trips(server, token_ids, n))
    finally:
        server.stop()  # the whole tree: BentoML's workers run in sessions of their own


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder; default: the pipeline's configured model")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--serve", action="store_true", help="also start the two tiers and time round trips")
    parser.add_argument("--port", type=int, default=8743)
    parser.add_argument("-n", type=int, default=50, help="round trips per kind")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the served tiers get stopped
    from bench.machine import describe_machine

    if args.model is None:
        from services.config import settings

        args.model = settings.model_path
    model = str(Path(args.model).resolve())
    result = {"machine": describe_machine(), "model": model, "cpu_tier_per_core": cpu_tier_costs(model)}
    print(json.dumps(result["cpu_tier_per_core"], indent=1), flush=True)
    if args.serve:
        log = Path(args.out).with_suffix(".server.log")
        extra = {"VLLM_CPU_KVCACHE_SPACE": "1"} if not result["machine"]["gpus"] else {}
        result["round_trips"] = serve_and_measure(model, args.load_format, args.port, args.n, log, extra)
        rt = result["round_trips"]
        rt["cpu_tier_adds_to_first_token_ms"] = round(
            rt["pipeline_generate_1_token_token_ids"]["p50_ms"] - rt["llm_generate_1_token_direct"]["p50_ms"], 3
        )
        print(json.dumps(rt, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
