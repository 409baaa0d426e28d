"""The routing benchmark's own parts (bench/datasets.py, bench/chat_load.py, bench/report/routing.py,
bench/routing.py), without engines: the conversations it sends (against a stand-in
OpenAI server), the ideal hit rate, and the report's targets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fake_gpu_tier import Server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench import routing
from bench.chat_load import chat_record, run_chat_load
from bench.datasets import ChatWorkload, Conversation, conversations, ideal_hit_rate
from bench.report.routing import analyse, load, markdown


class StandIn:
    """An OpenAI chat server that streams three chunks and usage, as vLLM's does, and keeps every
    conversation it was sent (its prompt length: 10 tokens a message)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[list[dict]] = []

    def app(self) -> Starlette:
        async def chat(request: Request) -> StreamingResponse:
            body = await request.json()
            self.received.append(body["messages"])
            assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]

            async def events():
                for piece in (f"{self.name}:", "answer", f"{len(body['messages'])}"):
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.001)
                usage = {"prompt_tokens": 10 * len(body["messages"]), "completion_tokens": 3}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_every_turn_resends_the_conversation_with_the_answers_and_requests_alternate_front_doors():
    first, second = StandIn("a"), StandIn("b")
    talks = [Conversation([f"c{c} t{t}" for t in range(3)], 0) for c in range(4)]
    workload = ChatWorkload("multiturn", concurrency=2, conversations=4, output_len=3, turns=3)
    with Server(first.app()) as a, Server(second.app()) as b:
        record = asyncio.run(run_chat_load([a.url, b.url], "m", workload, talks))
    assert len(first.received) == len(second.received) == 6, "each front door got every other request"
    for messages in first.received + second.received:
        users = [m["content"] for m in messages if m["role"] == "user"]
        conversation = users[0].split()[0]
        assert users == [f"{conversation} t{t}" for t in range(len(users))]
        answers = [m for m in messages if m["role"] == "assistant"]
        assert len(answers) == len(users) - 1 and all(m["content"].endswith(f"answer{2 * i + 1}")
                                                      for i, m in enumerate(answers))
    requests = record["requests"]
    assert requests["error"] == [""] * 12 and requests["output_len"] == [3] * 12
    assert sorted(requests["prompt_len"]) == sorted([10, 30, 50] * 4)
    assert all(len(gaps) == 2 for gaps in requests["itl_s"]) and all(t > 0 for t in requests["ttft_s"])


def test_a_refused_turn_is_an_error_and_ends_its_conversation():
    workload = ChatWorkload("multiturn", concurrency=1, conversations=1, output_len=3, turns=2)
    record = asyncio.run(run_chat_load(["http://127.0.0.1:9"], "m", workload, [Conversation(["x", "y"], 0)]))
    assert len(record["requests"]["error"]) == 1 and record["requests"]["error"][0]


def test_the_prefix_workload_is_vllms_prefix_repetition_prompts(tokenizer):
    workload = ChatWorkload("prefix", concurrency=2, conversations=8, output_len=4, seed=3, prefix_len=64,
                            suffix_len=16, num_prefixes=2)
    talks = conversations(workload, tokenizer)
    assert len(talks) == 8 and all(len(talk.turns) == 1 and talk.shared_prefix == 64 for talk in talks)
    heads = {talk.turns[0][:40] for talk in talks}
    assert len(heads) == 2, "eight prompts on two prefixes"
    assert [t.turns for t in conversations(workload, tokenizer)] == [t.turns for t in talks], "the seed fixes them"


def test_multiturn_conversations_are_made_of_ordinary_tokens(tokenizer):
    workload = ChatWorkload("multiturn", concurrency=1, conversations=2, output_len=4, turns=3, first_len=50, turn_len=10)
    talks = conversations(workload, tokenizer)
    assert [len(talk.turns) for talk in talks] == [3, 3]
    for text in talks[0].turns:
        assert "<|im_start|>" not in text and "<|im_end|>" not in text
    assert 40 <= len(tokenizer.encode(talks[0].turns[0], add_special_tokens=False)) <= 60


def test_the_mixed_workload_draws_prefixes_of_many_lengths_by_popularity(tokenizer):
    """64 prefixes of 256 to 8,192 tokens (log-uniform), the k-th picked with weight 1/k**1.1, each
    prompt its prefix's text and a suffix of its own."""
    workload = ChatWorkload("mixed", concurrency=4, conversations=400, output_len=4, seed=5, prefix_len=512,
                            suffix_len=8, num_prefixes=64, min_prefix_len=16, zipf=1.1)
    talks = conversations(workload, tokenizer)
    counts = [sum(talk.prefix == k for talk in talks) for k in range(64)]
    assert counts[0] > 3 * sum(counts[32:]) / 32, counts  # the most popular far above the tail
    lengths = {talk.prefix: talk.shared_prefix for talk in talks}
    assert min(lengths.values()) >= 16 and max(lengths.values()) <= 512 and len(set(lengths.values())) > 20
    same = [talk for talk in talks if talk.prefix == 0][:2]
    common = len(tokenizer.encode(same[0].turns[0], add_special_tokens=False))
    assert same[0].turns[0] != same[1].turns[0] and same[0].turns[0][:40] == same[1].turns[0][:40]
    assert common >= lengths[0]


def record_of(kind: str, prompt_lens: list[int], conversation: list[int], turn: list[int], **workload) -> dict:
    n = len(prompt_lens)
    requests = {"start_s": [0.0] * n, "ttft_s": [0.1] * n, "latency_s": [1.0] * n, "prompt_len": prompt_lens,
                "output_len": [8] * n, "itl_s": [[0.1] * 7] * n, "error": [""] * n, "conversation": conversation,
                "turn": turn}
    return {"workload": {"kind": kind, **workload}, "duration_s": 2.0, "requests": requests}


def test_the_ideal_hit_rate_of_shared_prefixes_counts_every_prompt_but_each_prefix_first():
    # 8 prompts of 2 prefixes of 64 tokens (+ 20 tokens each): 6 prompts could find 64 cached
    record = record_of("prefix", [84] * 8, list(range(8)), [0] * 8, num_prefixes=2, prefix_len=64)
    assert ideal_hit_rate(record, block_size=16) == pytest.approx(6 * 64 / (8 * 84))
    assert ideal_hit_rate(record, block_size=128) == 0.0, "a prefix shorter than a block is never a hit"


def test_the_ideal_hit_rate_of_mixed_prefixes_counts_every_prompt_but_the_first_on_its_prefix():
    # prompts on prefixes 0, 1, 0, 0, 1 (of 64 and 40 tokens, + 10 each), sent in that order: the
    # second and later on a prefix could reuse it in whole blocks of 16 (64 and 32)
    record = record_of("mixed", [74, 50, 74, 74, 50], list(range(5)), [0] * 5)
    record["requests"]["start_s"] = [0.0, 0.1, 0.2, 0.3, 0.4]
    record["prefix"], record["shared_prefix"] = [0, 1, 0, 0, 1], [64, 40, 64, 64, 40]
    assert ideal_hit_rate(record, block_size=16) == pytest.approx((64 + 64 + 32) / (3 * 74 + 2 * 50))


def test_the_ideal_hit_rate_of_a_conversation_is_each_turns_previous_prompt_in_whole_blocks():
    # one conversation: prompts of 100, 150, 210 tokens; turns 2 and 3 could reuse 96 and 144 (blocks of 16)
    record = record_of("multiturn", [150, 100, 210], [0, 0, 0], [1, 0, 2])
    assert ideal_hit_rate(record, block_size=16) == pytest.approx((96 + 144) / 460)


def run_file(folder: Path, name: str, throughput: float, ttft: float, hits: tuple[int, int], ideal: float,
             reasons: dict[str, float] | None = None) -> None:
    """A run's record: 10 requests of 10 output tokens over `10 * 10 / throughput` s, each with `ttft`."""
    duration = 100 / throughput
    requests = {"start_s": [0.0] * 10, "ttft_s": [ttft] * 10, "latency_s": [duration] * 10, "prompt_len": [100] * 10,
                "output_len": [10] * 10, "itl_s": [[0.01] * 9] * 10, "error": [""] * 10}
    replicas = {f"r{i}": {"vllm:prefix_cache_queries_total": 500.0, "vllm:prefix_cache_hits_total": float(hit),
                          "vllm:request_success_total": 5.0} for i, hit in enumerate(hits)}
    record = {"workload": {"kind": "prefix"}, "duration_s": duration, "requests": requests, "replicas": replicas,
              "ideal_hit_rate": ideal, **({"routing_reasons": reasons} if reasons else {})}
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_the_report_measures_each_target_as_the_median_of_the_rounds_ratios(tmp_path: Path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for round_, (ours, theirs) in enumerate([(130.0, 100.0), (120.0, 100.0), (90.0, 100.0)], start=1):
        run_file(runs, f"prefix-c32-pipeline-kv-r{round_}", ours, 0.05, (450, 440), ideal=0.9,
                 reasons={"held": 6.0 + round_, "new": 2.0, "load": 1.0, "guarded": 0.0})
        run_file(runs, f"prefix-c32-router-cache_aware-r{round_}", theirs, 0.1, (300, 400), ideal=0.9)
        run_file(runs, f"prefix-c32-pipeline-rr-r{round_}", 80.0, 0.2, (200, 200), ideal=0.9)
    report = analyse(load(tmp_path))["prefix-c32"]
    targets = {t["target"]: t for t in report["targets"] if t["system"] == "pipeline-kv"}
    throughput = targets["throughput >= 1.0x vllm-router cache_aware"]
    assert throughput["ratio"]["median"] == pytest.approx(1.2) and throughput["met"]
    assert (throughput["ratio"]["min"], throughput["ratio"]["max"]) == pytest.approx((0.9, 1.3))
    assert targets["TTFT p90 <= vllm-router cache_aware's"]["ratio"]["median"] == pytest.approx(0.5)
    assert len(targets) == 3, "pipeline-rr and the systems not run are no targets"
    hit = targets["hit rate within 3 points of the ideal"]
    assert hit["gap_points"]["median"] == pytest.approx(1.0) and hit["met"]
    assert report["systems"]["pipeline-kv"]["hit_rate"]["median"] == pytest.approx(0.89)
    assert report["systems"]["router-cache_aware"]["requests_per_replica"] == [[5, 5]] * 3
    text = markdown(analyse(load(tmp_path)), "t")
    assert "| pipeline-kv | 120 (90-130) |" in text and "**no**" not in text.split("| target")[1]
    # why the kv router chose as it did, per round (only the pipeline records it)
    assert "(held/new/load/guarded), per round: pipeline-kv 7/2/1/0, 8/2/1/0, 9/2/1/0" in text


def test_the_mixed_workload_is_reported_against_its_own_targets(tmp_path: Path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for round_, ours in enumerate([105.0, 112.0, 120.0], start=1):
        run_file(runs, f"mixed-c64-pipeline-kv-2fronts-r{round_}", ours, 0.05, (300, 300), ideal=0.7)
        run_file(runs, f"mixed-c64-router-cache_aware-r{round_}", 100.0, 0.1, (400, 400), ideal=0.7)
    report = analyse(load(tmp_path))["mixed-c64"]
    targets = {t["target"]: t for t in report["targets"]}
    assert {t["system"] for t in report["targets"]} == {"pipeline-kv-2fronts"}
    throughput = targets["throughput >= 1.10x vllm-router cache_aware"]
    assert throughput["ratio"]["median"] == pytest.approx(1.12) and throughput["met"]
    hit = targets["hit rate within 3 points of the ideal"]
    assert hit["gap_points"]["median"] == pytest.approx(10.0) and not hit["met"]


def test_workload_names_are_checked():
    assert routing.parse_run("prefix:32") == routing.Run("prefix", 32)
    for bad in ("prefix", "prefix:0", "chat:4", "random:x"):
        with pytest.raises(Exception):
            routing.parse_run(bad)


def test_chat_record_puts_turns_in_start_order():
    from bench.chat_load import Turn

    turns = [Turn(start_s=0.5, latency_s=1.0, itl_s=[]), Turn(start_s=0.1, latency_s=0.2, itl_s=[])]
    record = chat_record(turns, ChatWorkload("multiturn", 1, 1, 1), [])
    assert record["requests"]["start_s"] == [0.1, 0.5] and record["duration_s"] == pytest.approx(1.4)


def test_the_routers_belief_is_summed_per_replica_over_the_fronts(monkeypatch):
    """Beside the engines' counters, each run records what the fronts believed (requests routed,
    prompt blocks, blocks expected cached), per replica, summed over every front."""
    from bench import server_metrics

    pages = {
        "http://front-a/metrics": 'pipeline_replica_requests_total{replica="10.0.0.1:3000"} 3.0\n'
                                  'pipeline_replica_prompt_blocks_total{replica="10.0.0.1:3000"} 30.0\n'
                                  'pipeline_replica_cached_blocks_predicted_total{replica="10.0.0.1:3000"} 20.0\n'
                                  'pipeline_requests_total 9.0\n',
        "http://front-b/metrics": 'pipeline_replica_requests_total{replica="10.0.0.1:3000"} 1.0\n'
                                  'pipeline_replica_requests_total{replica="10.0.0.2:3000"} 2.0\n',
    }
    monkeypatch.setattr(server_metrics, "_get", pages.__getitem__)
    believed = server_metrics.router_counters(list(pages))
    assert believed["10.0.0.1:3000"] == {"pipeline_replica_requests_total": 4.0, "pipeline_replica_prompt_blocks_total": 30.0,
                                         "pipeline_replica_cached_blocks_predicted_total": 20.0}
    assert believed["10.0.0.2:3000"]["pipeline_replica_requests_total"] == 2.0
    assert server_metrics.router_counters([]) == {}


def test_the_kv_routers_reasons_are_summed_over_the_fronts(monkeypatch):
    from bench import server_metrics

    pages = {"http://front-a/metrics": 'pipeline_routing_decisions_total{reason="held"} 5.0\n'
                                       'pipeline_routing_decisions_total{reason="load"} 1.0\n',
             "http://front-b/metrics": 'pipeline_routing_decisions_total{reason="held"} 2.0\n'
                                       'pipeline_replica_requests_total{replica="10.0.0.1:3000"} 8.0\n'}
    monkeypatch.setattr(server_metrics, "_get", pages.__getitem__)
    assert server_metrics.routing_reasons(list(pages)) == {"held": 7.0, "load": 1.0}
