"""Chat conversations as load (bench/datasets.py's `ChatWorkload`): each turn a streamed
`/v1/chat/completions` call that resends the whole conversation so far, request i going to
`base_urls[i % n]` (as a load balancer in front of several fronts would). `vllm bench serve` has no
multi-turn dataset and sends to one URL, hence this. Figures follow vLLM's definitions (TTFT: the
first chunk carrying a choice; ITL: the gaps between such chunks); the record has the shape
bench/loadgen.py's `merge` gives, so bench/metrics.py's `summarize` reads it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass

import aiohttp

from bench.datasets import ChatWorkload, Conversation


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
        "prefix": [talk.prefix for talk in talks],
    }
