"""A stand-in for LLMService that streams frames at a set pace, to measure the CPU tier alone at a
GPU's token rates without a GPU (`python -m bench costs --parts front`). It speaks LLMService's
contract (services/protocol.py: `/generate` streams `GenerateDelta` frames, `/model_info`,
`/readyz`) and emits one token per choice every `--interval-ms`.

    python -m bench.paced_gpu_tier --port 3101 --interval-ms 2
"""

from __future__ import annotations

import argparse
import asyncio
import random

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from services.protocol import GenerateDelta, GenerateRequest, ModelInfo, encode_frame


def make_app(interval_s: float, vocab_size: int, max_model_len: int = 8192) -> Starlette:
    async def generate(request: Request) -> StreamingResponse:
        generation = GenerateRequest.model_validate((await request.json())["request"])
        prompt_tokens, max_tokens = len(generation.token_ids), generation.sampling_params.max_tokens
        rng = random.Random(generation.request_id)

        async def frames():
            for produced in range(1, max_tokens + 1):
                await asyncio.sleep(interval_s)
                yield encode_frame(
                    GenerateDelta(
                        token_ids=[rng.randrange(vocab_size)],
                        finish_reason="length" if produced == max_tokens else None,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=produced,
                    )
                )

        return StreamingResponse(frames(), media_type="application/x-ndjson")

    async def model_info(request: Request) -> JSONResponse:
        return JSONResponse(ModelInfo(model="paced", max_model_len=max_model_len, vocab_size=vocab_size).model_dump())

    async def ready(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/generate", generate, methods=["POST"]),
            Route("/model_info", model_info, methods=["POST"]),
            Route("/readyz", ready),
            Route("/livez", ready),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=3101)
    parser.add_argument("--interval-ms", type=float, default=2.0, help="time between two tokens of one choice")
    parser.add_argument("--vocab-size", type=int, default=49152)
    args = parser.parse_args()
    app = make_app(args.interval_ms / 1000, args.vocab_size)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
