"""What the benchmarks send: every workload and fixed prompt in one place.

- `Workload`: `vllm bench serve`'s random prompts (`input_len` tokens in, `output_len` out), run
  by bench/loadgen.py;
- `ChatWorkload`: chat conversations, run by bench/chat_load.py: `prefix` (vLLM's prefix_repetition
  prompts: shared prefixes, one turn each), `mixed` (prefixes of many lengths, Zipf-popular, each
  prompt one of them and text of its own) or `multiturn` (each turn resends the history);
- the fixed prompts of the start-up, cost, LoRA and structured-output measurements.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHORT_PROMPT = "What is the capital of France?"  # a chat request's whole text: costs, serve.sh's first token
LONG_TEXT = (
    "The history of superconductivity begins in 1911, when Heike Kamerlingh Onnes cooled mercury with "
    "liquid helium and watched its electrical resistance vanish below about four kelvin. For decades "
    "nobody could explain why. The answer came in 1957 from Bardeen, Cooper and Schrieffer: electrons "
    "pair up through vibrations of the crystal lattice, and the pairs move together without scattering. "
)
LORA_PROMPT = "The history of the bicycle spans more than two centuries. Early designs had no pedals and were pushed"
PERSON_QUESTION = [{"role": "user", "content": "Invent a person: a name, an age and a city."}]


def person_schema(field: str) -> dict:
    """A JSON schema of a person with `name`, `age` and `field`: a new `field` is a new grammar."""
    return {"type": "object", "additionalProperties": False, "required": ["name", "age", field],
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, field: {"type": "string"}}}


def startup_prompt(length: int) -> list[int]:
    """The same token ids for every server a start-up is measured on."""
    return [(7919 * i) % 30000 + 100 for i in range(length)]


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    concurrency: int
    num_prompts: int
    seed: int = 0
    clients: int = 1  # load-generator processes


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
    min_prefix_len: int = 256  # mixed: prefix lengths are drawn log-uniform from here to prefix_len
    zipf: float = 1.1  # mixed: the k-th prefix's popularity is 1 / k**zipf

    @property
    def label(self) -> str:
        return f"{self.kind}-c{self.concurrency}"


@dataclass
class Conversation:
    turns: list[str]  # the user's messages, in order
    shared_prefix: int  # tokens of the first message another conversation starts with (prefix: the prefix)
    prefix: int | None = None  # mixed: which of the workload's prefixes it starts with


def conversations(workload: ChatWorkload, tokenizer) -> list[Conversation]:
    if workload.kind == "prefix":
        from vllm.benchmarks.datasets import PrefixRepetitionRandomDataset

        samples = PrefixRepetitionRandomDataset(random_seed=workload.seed).sample(
            tokenizer, workload.conversations, prefix_len=workload.prefix_len, suffix_len=workload.suffix_len,
            num_prefixes=workload.num_prefixes, output_len=workload.output_len)
        return [Conversation([sample.prompt], workload.prefix_len) for sample in samples]
    rng = random.Random(workload.seed)
    ordinary = [i for i in range(tokenizer.vocab_size) if i not in set(tokenizer.all_special_ids)]

    def text(tokens: int) -> str:
        return tokenizer.decode([rng.choice(ordinary) for _ in range(tokens)], skip_special_tokens=True)

    if workload.kind == "mixed":
        lengths = [int(workload.min_prefix_len * (workload.prefix_len / workload.min_prefix_len) ** rng.random())
                   for _ in range(workload.num_prefixes)]
        prefixes = [text(length) for length in lengths]
        weights = [1 / (rank + 1) ** workload.zipf for rank in range(workload.num_prefixes)]
        picks = rng.choices(range(workload.num_prefixes), weights, k=workload.conversations)
        return [Conversation([prefixes[pick] + text(workload.suffix_len)], lengths[pick], pick) for pick in picks]
    if workload.kind == "multiturn":
        return [Conversation([text(workload.first_len), *(text(workload.turn_len) for _ in range(workload.turns - 1))], 0)
                for _ in range(workload.conversations)]
    raise ValueError(f"unknown chat workload {workload.kind!r}: prefix, mixed or multiturn")


def ideal_hit_rate(record: dict, block_size: int) -> float:
    """The share of prompt tokens a perfect router could serve from cache, in whole blocks of
    `block_size`: in `prefix`, the prefix of every prompt but the first of its group (vLLM's
    prompts do not say which prefix they carry; the groups are the workload's `num_prompts //
    num_prefixes` prompts per prefix); in `mixed`, the prefix of every prompt but the first sent on
    it (its length as asked for: the tokenizer may make it a few tokens longer or shorter); in `multiturn`, each turn's previous prompt (the answer that
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
    elif workload["kind"] == "mixed":  # every prompt but the first on its prefix hits that prefix
        seen: set[int] = set()
        hits = 0
        for i in sorted(range(len(requests["start_s"])), key=lambda i: requests["start_s"][i]):
            if requests["error"][i]:
                continue
            prefix = record["prefix"][requests["conversation"][i]]
            hits += whole(record["shared_prefix"][requests["conversation"][i]]) if prefix in seen else 0
            seen.add(prefix)
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
