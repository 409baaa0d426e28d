"""Multi-LoRA parity: the pipeline against vLLM's own server, both serving the same adapters.

Adapters are made for the default model when the module starts (bench/lora_adapters.py: peft,
rank 8 on q_proj and v_proj, random non-zero weights from fixed seeds, so each answers differently
from the base model), in a temporary folder; nothing is downloaded or kept. Two are configured
(`a`, `b`), one is loaded at run time (`c`), and two are bad (rank 16 over the maximum of 8, and
a folder that is not an adapter).

vLLM's server: the flags of test_openai_parity.py's server plus `--enable-lora --max-lora-rank 8
--max-loras 3 --lora-modules a=... b=...` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1. The pipeline:
`bentoml serve` with PIPELINE_LORA_MODULES, PIPELINE_MAX_LORA_RANK, PIPELINE_MAX_LORAS,
PIPELINE_ALLOW_RUNTIME_LORA_UPDATING, two front workers and two LLMService engine clients
(PIPELINE_ENGINE_CLIENTS=2), so a load through one worker of each tier must be seen by the other. One of each for the whole module; short answers.

Greedy answers must be identical (text, finish reason, token counts), also when the base model
and both adapters run interleaved in one concurrent burst. Where vLLM's server answers a bad
load with 500 (a rank over the maximum), the pipeline answers 400 with vLLM's message.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_openai_parity import HERMES_TEMPLATE, MODEL_NAME, START_TIMEOUT_S, call, model_folder, summary

from bench.lora_adapters import make_adapter
from harness import ROOT, EngineSettings, Server, free_port, make_server, own_bentoml_home, serve_pipeline
from services.gpu.engine_args import CPU_DTYPE

LOGS = ROOT / ".cache" / "test-logs"
MAX_RANK = 8
# One adapter slot more than a burst uses: on CPU, vLLM's torch LoRA ops pick each token's adapter
# slot with `weights[index]`, and a token of a request without an adapter has index -1, which
# Python reads as the last slot. With the last slot free (zeros) base-model requests batched with
# adapter requests answer as the base model; with it taken they answer as that adapter, on vLLM's
# own server too (docs/benchmarks.md). vLLM's GPU kernels skip index -1.
MAX_LORAS = 3
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea."]
PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn is"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    base = model_folder()
    made = {name: make_adapter(base, folder / name, seed=seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    made["rank16"] = make_adapter(base, folder / "rank16", seed=4, rank=16)
    (not_an_adapter := folder / "not-an-adapter").mkdir()
    (not_an_adapter / "README.md").write_text("no adapter here\n")
    made["not-an-adapter"] = not_an_adapter
    return made


def lora_modules(adapters: dict[str, Path]) -> list[str]:
    return [f"{name}={adapters[name]}" for name in ("a", "b")]


@pytest.fixture(scope="module")
def servers(adapters, tmp_path_factory: pytest.TempPathFactory):
    """(pipeline, vLLM's server), both with the adapters, started side by side."""
    settings = EngineSettings(model=model_folder(), served_name=MODEL_NAME, max_model_len=2048, dtype=CPU_DTYPE,
                              enforce_eager=True, cpu=True, cpu_kvcache_gib=1)
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--chat-template", str(HERMES_TEMPLATE),
             "--enable-lora", "--max-lora-rank", str(MAX_RANK), "--max-loras", str(MAX_LORAS), "--lora-modules",
             *lora_modules(adapters)]
    vllm = make_server("vllm", settings, free_port(), tmp_path_factory.mktemp("vllm-lora"), vllm_args=flags)
    vllm.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    name = f"pipeline-lora-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    vllm.start()
    pipeline: Server | None = None
    try:
        pipeline = serve_pipeline(log=LOGS / f"{name}.log", env={
            "BENTOML_HOME": own_bentoml_home(LOGS / name),
            "PIPELINE_LORA_MODULES": " ".join(lora_modules(adapters)),
            "PIPELINE_MAX_LORA_RANK": str(MAX_RANK),
            "PIPELINE_MAX_LORAS": str(MAX_LORAS),
            "PIPELINE_ALLOW_RUNTIME_LORA_UPDATING": "true",
            "PIPELINE_PROMPT_WORKERS": "2",
            "PIPELINE_ENGINE_CLIENTS": "2",  # two LLMService workers: an adapter loaded through one is served by both
        }, ready_timeout_s=START_TIMEOUT_S)
        vllm.wait_ready(START_TIMEOUT_S)
        yield pipeline, vllm
    finally:
        if pipeline is not None:
            pipeline.stop()
        vllm.stop()


def post(url: str, path: str, body: dict) -> httpx.Response:
    with httpx.Client(timeout=httpx.Timeout(180, connect=5)) as http:
        return http.post(url + path, json=body)


def models(url: str) -> list[tuple]:
    with httpx.Client(timeout=10) as http:
        return [(m["id"], m["parent"], m["root"]) for m in http.get(url + "/v1/models").json()["data"]]


def answers(url: str, requests: list[tuple[str, dict]]) -> list[tuple[int, dict]]:
    """All requests at once (one concurrent burst), answers in request order."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda request: call(url, *request), requests))


def test_models_lists_the_same_adapters_and_parents(servers):
    pipeline, vllm = servers
    ours, theirs = models(pipeline.url), models(vllm.url)
    assert [(i, p) for i, p, _ in ours] == [(MODEL_NAME, None), ("a", MODEL_NAME), ("b", MODEL_NAME)]
    assert ours[1:] == theirs[1:]  # the adapters' roots are their folders on both


def test_a_burst_of_base_and_adapters_interleaved_answers_as_vllm(servers):
    """Chat and completions on the base model and two adapters, 18 requests at once on each
    server: the same text, finish reasons and token counts; and the adapters change the answers."""
    pipeline, vllm = servers
    requests = []
    for i in range(3):
        for model in (MODEL_NAME, "a", "b"):
            requests.append(("/v1/chat/completions", {"model": model, "temperature": 0, "max_tokens": 24,
                                                      "messages": [{"role": "user", "content": QUESTIONS[i]}]}))
            requests.append(("/v1/completions", {"model": model, "temperature": 0, "max_tokens": 16,
                                                 "prompt": PROMPTS[i], **({"stream": True, "stream_options": {"include_usage": True}} if i == 2 else {})}))
    ours, theirs = answers(pipeline.url, requests), answers(vllm.url, requests)
    for (path, body), (status, mine), (ref_status, ref) in zip(requests, ours, theirs):
        assert (status, ref_status) == (200, 200), (body, mine, ref)
        assert summary(mine) == summary(ref), (path, body["model"])
        if "model" in mine:
            assert mine["model"] == ref["model"] == body["model"]
    texts = {}
    for (path, body), (_, mine) in zip(requests, ours):
        texts.setdefault(body["model"], []).append(summary(mine)["choices"][0][1])
    assert texts["a"] != texts[MODEL_NAME] and texts["b"] != texts[MODEL_NAME] and texts["a"] != texts["b"]


def test_an_unknown_adapter_is_the_same_404(servers):
    pipeline, vllm = servers
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        body = {**body, "model": "no-such-adapter", "max_tokens": 4}
        ours, theirs = post(pipeline.url, path, body), post(vllm.url, path, body)
        assert ours.status_code == theirs.status_code == 404
        assert ours.json() == theirs.json()


def test_generate_takes_an_adapter_by_name(servers):
    """/generate with `model` (or `adapter`) answers as the adapter does on vLLM's chat route."""
    pipeline, vllm = servers
    question = QUESTIONS[0]
    reference = call(vllm.url, "/v1/chat/completions", {
        "model": "a", "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": question}]})[1]
    for field in ("model", "adapter"):
        response = post(pipeline.url, "/generate", {"prompt": question, "temperature": 0, "max_tokens": 16, field: "a"})
        assert response.status_code == 200, response.text
        assert response.text == reference["choices"][0]["message"]["content"]
    unknown = post(pipeline.url, "/generate", {"prompt": question, "max_tokens": 4, "model": "no-such-adapter"})
    assert unknown.status_code == 404 and "no-such-adapter" in unknown.text


def same_update(servers, path: str, body: dict, status: int | None = None) -> httpx.Response:
    """Both servers' answer to a load or unload: the same status (or `status` for ours) and body."""
    pipeline, vllm = servers
    ours, theirs = post(pipeline.url, path, body), post(vllm.url, path, body)
    assert ours.status_code == (status or theirs.status_code), (ours.text, theirs.text)
    if ours.status_code == 200:
        assert ours.text == theirs.text
    else:
        assert ours.json()["error"]["message"] == theirs.json()["error"]["message"]
        if status is None:
            assert ours.json() == theirs.json()
    return ours


def test_an_adapter_loaded_and_unloaded_at_run_time(servers, adapters):
    """Load `c` on both; a request on it answers the same on both and differs from `a`; /v1/models
    agrees; a second load is refused; after the unload it is a 404 on both, and so is a second unload."""
    pipeline, vllm = servers
    same_update(servers, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["c"])})
    assert models(pipeline.url)[1:] == models(vllm.url)[1:]
    assert "c" in [name for name, _, _ in models(pipeline.url)]
    body = {"model": "c", "temperature": 0, "max_tokens": 24, "messages": [{"role": "user", "content": QUESTIONS[1]}]}
    assert len(pipeline.workers()["LLMService"]) == 2
    reference = summary(call(vllm.url, "/v1/chat/completions", body)[1])
    # at once, so that both front workers and both engine clients take some (the load went through one of each)
    for status, answer in answers(pipeline.url, [("/v1/chat/completions", body)] * 6):
        assert status == 200 and summary(answer) == reference
    same_update(servers, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["c"])})  # 400
    same_update(servers, "/v1/unload_lora_adapter", {"lora_name": "c"})
    for _ in range(2):
        assert post(pipeline.url, "/v1/chat/completions", body).json() == post(vllm.url, "/v1/chat/completions", body).json()
    same_update(servers, "/v1/unload_lora_adapter", {"lora_name": "c"})  # 404
    assert models(pipeline.url)[1:] == models(vllm.url)[1:]


@pytest.mark.parametrize("case", ["no such folder", "not an adapter", "rank over the maximum", "base model's name",
                                  "no path"])
def test_bad_loads_are_refused_clearly_and_the_engine_serves_on(servers, adapters, case: str):
    """vLLM's statuses and messages, except that its 500 for a rank over the maximum is a 400
    here; never a 500, and both engines answer the next request the same."""
    body, status = {
        "no such folder": ({"lora_name": "x", "lora_path": "/no/such/folder"}, None),
        "not an adapter": ({"lora_name": "x", "lora_path": str(adapters["not-an-adapter"])}, None),
        "rank over the maximum": ({"lora_name": "x", "lora_path": str(adapters["rank16"])}, 400),
        "base model's name": ({"lora_name": MODEL_NAME, "lora_path": str(adapters["c"])}, None),
        "no path": ({"lora_name": "x", "lora_path": ""}, None),
    }[case]
    refused = same_update(servers, "/v1/load_lora_adapter", body, status)
    assert 400 <= refused.status_code < 500
    pipeline, vllm = servers
    assert "x" not in [name for name, _, _ in models(pipeline.url)]
    question = {"model": "a", "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert summary(call(pipeline.url, "/v1/chat/completions", question)[1]) == \
        summary(call(vllm.url, "/v1/chat/completions", question)[1])


def test_a_stream_on_an_adapter_unloaded_meanwhile_finishes(servers, adapters):
    """Unloading an adapter does not cut the requests running on it (as in vLLM, the engine keeps
    its weights until evicted): the stream ends normally, and the next request is a 404."""
    pipeline, _ = servers
    load = post(pipeline.url, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(adapters["c"])})
    assert load.status_code == 200, load.text
    body = {"model": "d", "prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=httpx.Timeout(120, connect=5)) as http, \
            http.stream("POST", pipeline.url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert post(pipeline.url, "/v1/unload_lora_adapter", {"lora_name": "d"}).status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join([first, *rest])
    assert post(pipeline.url, "/v1/completions", {**body, "stream": False}).status_code == 404
    assert pipeline.engine_load() == 0


def test_front_metrics_count_requests_and_tokens_per_adapter(servers):
    pipeline, _ = servers
    with httpx.Client(timeout=10) as http:
        text = http.get(pipeline.url + "/metrics").text
    counted = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line.startswith("pipeline_lora_")}
    assert counted.get('pipeline_lora_requests_total{adapter="a"}', 0) >= 6, counted
    assert counted.get('pipeline_lora_completion_tokens_total{adapter="b"}', 0) > 0, counted
