"""A BentoML service that streams small NDJSON lines, to measure the per-chunk cost of BentoML's
HTTP path (`python -m bench costs --parts chunks`). CHUNK_VARIANT: 0 BentoML's defaults; 1 tracing,
metrics and access log off; 2 only the route excluded from tracing; 3 only metrics and access log off.
"""
import os
from collections.abc import AsyncGenerator

import bentoml

LEAN = os.environ.get("CHUNK_VARIANT", "0")
options = {}
if LEAN in ("1", "2"):  # 2: tracing only
    options["tracing"] = {"excluded_urls": ["stream"]}
if LEAN in ("1", "3"):  # 3: metrics and access log only
    options["metrics"] = {"enabled": False, "namespace": "bentoml_service"}
    options["logging"] = {"access": {"enabled": False}}


@bentoml.service(workers=1, traffic={"concurrency": 4096}, **options)
class ChunkStream:
    @bentoml.api
    async def stream(self, n: int = 1000) -> AsyncGenerator[str, None]:
        import asyncio

        line = '{"index":0,"token_ids":[1234],"prompt_tokens":512,"completion_tokens":17}\n'
        for _ in range(n):
            yield line
            await asyncio.sleep(0)
