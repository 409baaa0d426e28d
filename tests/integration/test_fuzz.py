"""Fuzz the API from its own OpenAPI document (schemathesis): valid and invalid inputs for every
route in it (generation, tokenizer, models, health, metrics). No input may give a 5xx or hang, and
the server still answers a normal request afterwards. Bounded: FUZZ_EXAMPLES per route and mode
(FUZZ_GENERATION_EXAMPLES for valid inputs to the generation routes, the slow ones), outputs
capped at a few tokens. FUZZ_REPORT=path writes the counts as JSON (scripts/fuzz_api.sh,
the long run whose result is in docs/)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.core import NotSet

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
FUZZ_GENERATION_EXAMPLES = int(os.environ.get("FUZZ_GENERATION_EXAMPLES", str(FUZZ_EXAMPLES)))
GENERATION_ROUTES = {"/generate", "/v1/chat/completions", "/v1/completions"}
OUTPUT_CAP = 8  # tokens: the fuzz is about inputs, not about waiting for long outputs
HANG_S = 120  # no answer by then is a hang (a capped request takes seconds; a loaded machine, a minute)
seen: Counter = Counter()
slowest = {"seconds": 0.0, "case": None}
SLOW_S = 10  # answers slower than this are listed in the report, with their bodies
slow_answers: list[dict] = []


def cap_output(case) -> None:
    """Keep generated outputs short: max_tokens above the cap (or unset) becomes the cap, and at
    most two choices; an absent body (all defaults: 1024 tokens) gets the cap too."""
    if isinstance(case.body, NotSet) and case.path in GENERATION_ROUTES:
        case.body = {}
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)  # an integral float (1717.0) is taken as an int, so capped too
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > OUTPUT_CAP:
            body[key] = OUTPUT_CAP
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = OUTPUT_CAP  # absent, or null (which means the default)
    if isinstance(body.get("n"), (int, float)) and not isinstance(body["n"], bool) and body["n"] > 2:
        body["n"] = 2


def operations(url: str):
    """The fuzzed routes of the running server's OpenAPI document, read as it is served."""
    document = httpx.get(f"{url}/docs.json", timeout=30).json()
    loaded = schemathesis.openapi.from_dict(document)
    return [result.ok() for result in loaded.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gives_a_server_error_or_hangs(pipeline, mode):
    """Valid inputs (POSITIVE) and inputs that break the schema (NEGATIVE), FUZZ_EXAMPLES per
    route each (FUZZ_GENERATION_EXAMPLES of valid generation requests), sent as they are except
    for a cap on output length. Every route fuzzed must really have been sent requests: most of its
    examples (a GET without parameters has a single one)."""
    found = operations(pipeline.url)
    assert {op.path for op in found} >= GENERATION_ROUTES | {"/v1/models", "/tokenize", "/detokenize", "/metrics"}
    sent: Counter = Counter()
    for operation in found:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no body or parameters to break (/v1/models, health, metrics)

        valid_generation = mode is GenerationMode.POSITIVE and operation.path in GENERATION_ROUTES

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=FUZZ_GENERATION_EXAMPLES if valid_generation else FUZZ_EXAMPLES, deadline=None,
                  derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def fuzz(case):
            cap_output(case)
            started = time.monotonic()
            response = case.call(base_url=pipeline.url, timeout=HANG_S)  # raises on a hang
            elapsed = time.monotonic() - started
            seen[f"{mode.value} {case.method} {case.path} {response.status_code}"] += 1
            sent[f"{case.method.upper()} {case.path}"] += 1
            if elapsed > slowest["seconds"]:
                slowest.update(seconds=round(elapsed, 3), case=f"{case.method} {case.path}")
            if elapsed > SLOW_S:
                slow_answers.append({"seconds": round(elapsed, 1), "case": f"{case.method} {case.path}",
                             "status": response.status_code, "body": json.dumps(case.body, default=str)[:1000]})
            assert response.status_code < 500, (case.path, case.body, response.status_code, response.text[:500])
            assert elapsed < HANG_S, (case.path, case.body, elapsed)
            if response.status_code >= 400:
                assert "error" in response.text.lower() or "detail" in response.text.lower(), response.text[:500]

        fuzz()

    def floor(op) -> int:
        if op.method.upper() == "GET":
            return 1
        examples = FUZZ_GENERATION_EXAMPLES if mode is GenerationMode.POSITIVE and op.path in GENERATION_ROUTES else FUZZ_EXAMPLES
        return examples // 2

    floors = {f"{op.method.upper()} {op.path}": floor(op)
              for op in found if mode is GenerationMode.POSITIVE or op.method.upper() != "GET"}
    assert all(sent[route] >= floor for route, floor in floors.items()), (dict(sent), floors)


def test_the_server_still_answers_after_the_fuzz(pipeline, record_property):
    """A normal request afterwards gets the model's usual greedy answer (the report, when asked
    for, is written first, with that answer)."""
    total = sum(seen.values())
    record_property("fuzzed_requests", total)
    print(f"\nfuzzed requests: {total}; by route and status: {dict(sorted(seen.items()))}")
    with httpx.Client(base_url=pipeline.url, timeout=httpx.Timeout(60, connect=5)) as http:
        response = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 16,
        })
        answer = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else response.text
        ready = http.get("/readyz").status_code
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps({
            "requests": total,
            "examples_per_route_and_mode": FUZZ_EXAMPLES,
            "examples_of_valid_generation_requests_per_route": FUZZ_GENERATION_EXAMPLES,
            "server_errors": sum(n for key, n in seen.items() if int(key.rsplit(" ", 1)[1]) >= 500),
            "hang_limit_s": HANG_S,
            "slowest_response": slowest,
            f"answers_over_{SLOW_S}_s": slow_answers,
            "afterwards": {"status": response.status_code, "greedy_answer": answer, "readyz": ready},
            "by_mode_route_status": dict(sorted(seen.items())),
        }, indent=1) + "\n")
    assert response.status_code == 200
    assert "Paris" in answer
    assert ready == 200
