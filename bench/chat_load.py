"""Chat conversations as load, for the routing benchmark (scripts/routing_bench.py): each turn a
streamed `/v1/chat/completions` call that resends the whole conversation so far.

Two workloads, both built from token ids the model's tokenizer decodes, with a seed:
- `prefix`: vLLM's own `prefix_repetition` prompts (`PrefixRepetitionRandomDataset`, the prompts
  `vllm bench serve --dataset-name prefix_repetition` sends for the same seed): `num_prefixes`
  shared prefixes of `prefix_len` tokens, each prompt one of them plus `suffix_len` tokens of its
  own, one turn each, in vLLM's shuffled order;
- `multiturn`: conversations of `turns` turns (a first message of `first_len` tokens, then
  `turn_len` tokens a turn), each turn's prompt the whole history with the server's own answers,
  as vLLM's multi-turn benchmark (benchmarks/multi_turn in vLLM's repository, not its wheel) sends
  them. `concurrency` conversations run at once, each turn after the previous one's answer.

Why not `vllm bench serve` for these: it has no multi-turn dataset, and it sends to one URL, while
the two-front run spreads every prefix over both PromptService replicas (request i goes to
`base_urls[i % n]`, as a load balancer in front of them would).

Figures follow vLLM's definitions (its `async_request_openai_chat_completions`): TTFT is the first
chunk carrying a choice, ITL the gaps between such chunks, latency the last of them, token counts
from the final usage chunk. The record has the shape bench/loadgen.py's `merge` gives, so
bench/metrics.py's `summarize` reads it, plus each request's shared-prefix length for the ideal
cache-hit rate (`ideal_hit_rate`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass

import aiohttp


@dataclass(frozen=True)
class ChatWorkload:
    kind: str  # "prefix" or "multiturn"
    concurrency: int
    conversations: int  # prefix: prompts (one turn each); multiturn: conversations
    output_len: int
    seed: int = 0
    prefix_len: int = 2048
    suffix_len: int = 128
    num_prefixes: int = 16
    turns: int = 4
    first_len: int = 1024
    turn_len: int = 128

    @property
    def label(self) -> str:
        return f"{self.kind}-c{self.concurrency}"


@dataclass
class Conversation:
    turns: list[str]  # the user's messages, in order
    shared_prefix: int  # tokens of the first message another conversation starts with (prefix: the prefix)


def conversations(workload: ChatWorkload, tokenizer) -> list[Conversation]:
    if workload.kind == "prefix":
        from vllm.benchmarks.datasets import PrefixRepetitionRandomDataset

        samples = PrefixRepetitionRandomDataset(random_seed=workload.seed).sample(
            tokenizer, workload.conversations, prefix_len=workload.prefix_len, suffix_len=workload.suffix_len,
            num_prefixes=workload.num_prefixes, output_len=workload.output_len)
        return [Conversation([sample.prompt], workload.prefix_len) for sample in samples]
    if workload.kind == "multiturn":
        rng = random.Random(workload.seed)
        ordinary = [i for i in range(tokenizer.vocab_size) if i not in set(tokenizer.all_special_ids)]

        def text(tokens: int) -> str:
            return tokenizer.decode([rng.choice(ordinary) for _ in range(tokens)], skip_special_tokens=True)

        return [Conversation([text(workload.first_len), *(text(workload.turn_len) for _ in range(workload.turns - 1))], 0)
                for _ in range(workload.conversations)]
    raise ValueError(f"unknown chat workload {workload.kind!r}: prefix or multiturn")


@dataclass
class Turn:
    """One request's figures (seconds from the load's start; error '' when it succeeded)."""

    start_s: float
    ttft_s: float = 0.0
    latency_s: float = 0.0
    prompt_len: int = 0
    output_len: int = 0
    itl_s: list[float] | None = None
    error: str = ""
    conversation: int = 0
    turn: int = 0
    answer: str = ""


async def chat_turn(session: aiohttp.ClientSession, url: str, model: str, messages: list[dict], output_len: int,
                    origin: float) -> Turn:
    body = {"model": model, "messages": messages, "max_completion_tokens": output_len, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    turn, gaps, text, last = Turn(start_s=started - origin), [], [], started
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                turn.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return turn
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    data = event.decode().strip().removeprefix("data: ")
                    if not data or data.startswith(":") or data == "[DONE]":
                        continue
                    message, now = json.loads(data), time.perf_counter()
                    if message.get("choices"):
                        if turn.ttft_s == 0.0:
                            turn.ttft_s = now - started
                        else:
                            gaps.append(now - last)
                        text.append(message["choices"][0].get("delta", {}).get("content") or "")
                        last = now
                    elif usage := message.get("usage"):
                        turn.prompt_len, turn.output_len = usage["prompt_tokens"], usage["completion_tokens"]
        if turn.ttft_s == 0.0:
            turn.error = "no chunk with a choice came back"
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        turn.error = repr(error)
    turn.latency_s, turn.itl_s, turn.answer = last - started, gaps, "".join(text)
    return turn


async def run_chat_load(base_urls: list[str], model: str, workload: ChatWorkload, talks: list[Conversation],
                        timeout_s: float = 3600) -> dict:
    """Every conversation of `talks`, `workload.concurrency` at a time; the record (loadgen's shape)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(talks)):
        queue.put_nowait(index)
    turns: list[Turn] = []
    sent = 0
    origin = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while not queue.empty():
            index = queue.get_nowait()
            messages: list[dict] = []
            for number, user in enumerate(talks[index].turns):
                messages.append({"role": "user", "content": user})
                url = base_urls[sent % len(base_urls)]
                sent += 1
                turn = await chat_turn(session, url, model, messages, workload.output_len, origin)
                turn.conversation, turn.turn = index, number
                turns.append(turn)
                if turn.error:
                    break  # the rest of this conversation would not be the workload's
                messages.append({"role": "assistant", "content": turn.answer})

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(workload.concurrency)))
    return chat_record(turns, workload, talks)


def chat_record(turns: list[Turn], workload: ChatWorkload, talks: list[Conversation]) -> dict:
    turns = sorted(turns, key=lambda turn: turn.start_s)
    ends = [turn.start_s + turn.latency_s for turn in turns]
    requests = {
        "start_s": [round(turn.start_s, 6) for turn in turns],
        "ttft_s": [turn.ttft_s for turn in turns],
        "latency_s": [turn.latency_s for turn in turns],
        "prompt_len": [turn.prompt_len for turn in turns],
        "output_len": [turn.output_len for turn in turns],
        "itl_s": [[round(gap, 6) for gap in turn.itl_s or []] for turn in turns],
        "error": [turn.error for turn in turns],
        "conversation": [turn.conversation for turn in turns],
        "turn": [turn.turn for turn in turns],
    }
    origin = min(requests["start_s"], default=0.0)
    return {
        "workload": asdict(workload),
        "duration_s": (max(ends) - origin) if ends else 0.0,
        "requests": requests,
        "shared_prefix": [talk.shared_prefix for talk in talks],
    }


def ideal_hit_rate(record: dict, block_size: int) -> float:
    """The share of prompt tokens a perfect router could serve from cache, in whole blocks of
    `block_size`: in `prefix`, the prefix of every prompt but the first of its group (vLLM's
    prompts do not say which prefix they carry; the groups are the workload's `num_prompts //
    num_prefixes` prompts per prefix); in `multiturn`, each turn's previous prompt (the answer that
    followed it re-tokenized need not match the engine's own tokens, so it is left out)."""
    requests, workload = record["requests"], record["workload"]
    prompts = [length for length, error in zip(requests["prompt_len"], requests["error"]) if not error]
    total = sum(prompts)
    if not total:
        return float("nan")
    whole = lambda tokens: tokens // block_size * block_size  # noqa: E731
    if workload["kind"] == "prefix":
        completed = len(prompts)
        groups = min(workload["num_prefixes"], completed)
        hits = (completed - groups) * whole(workload["prefix_len"])
    else:
        previous: dict[int, int] = {}
        hits = 0
        order = sorted(range(len(requests["turn"])), key=lambda i: (requests["conversation"][i], requests["turn"][i]))
        for i in order:
            if requests["error"][i]:
                continue
            conversation = requests["conversation"][i]
            hits += whole(previous.get(conversation, 0))
            previous[conversation] = requests["prompt_len"][i]
    return hits / total
