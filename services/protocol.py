"""The contract between the tiers: what PromptService sends LLMService, and what streams back.

Token ids in, token ids out: a `GenerateRequest` shaped after vLLM's, and a stream of
`GenerateDelta` frames, one line of JSON each, which `DeltaDecoder` parses from bytes however the
transport cuts them (docs/architecture.md, "Framing").
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

FinishReason = Literal["stop", "length", "abort"]

CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class StructuredOutputs(BaseModel):
    """A grammar for the engine to apply while sampling: vLLM's `StructuredOutputsParams`.

    Exactly one constraint (`CONSTRAINTS`), plus vLLM's options. Only the shape is checked here;
    the engine compiles the grammar (it needs the tokenizer's vocabulary) and refuses a schema,
    regex or grammar it cannot compile with a 400 that names the problem.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (object or JSON text)")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="an EBNF (GBNF) or Lark grammar")
    json_object: bool | None = Field(None, description="any JSON object")
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputs:
        given = [name for name in CONSTRAINTS if self.constraint(name) is not None]
        if len(given) != 1:
            raise ValueError(
                "structured outputs take exactly one constraint of "
                f"{', '.join(CONSTRAINTS)}; got {len(given)}{': ' + ', '.join(given) if given else ''}"
            )
        return self

    def constraint(self, name: str) -> Any:
        return self.json_ if name == "json" else getattr(self, name)

    def engine_fields(self) -> dict[str, Any]:
        """The keyword arguments of vLLM's StructuredOutputsParams."""
        return self.model_dump(by_alias=True, exclude_defaults=True)


class SamplingParams(BaseModel):
    """The subset of vLLM's SamplingParams that makes sense without a tokenizer.

    Ranges follow vLLM's own checks (vllm/sampling_params.py), so a request that passes here is
    one the engine accepts. Stop *strings* are not here: they are text, handled by the front tier.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n: int = Field(1, ge=1, le=16)
    max_tokens: int = Field(ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=2**31 - 1, description="0 or -1: all tokens")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top logprobs per output token")
    structured_outputs: StructuredOutputs | None = Field(None, description="a grammar the output must follow")

    @model_validator(mode="after")
    def _min_within_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self


class GenerateRequest(BaseModel):
    """One generation: a tokenized prompt and how to sample its continuation."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    token_ids: list[int] = Field(min_length=1)
    sampling_params: SamplingParams
    stream: bool = True
    adapter: str | None = Field(None, min_length=1, description="the LoRA adapter to run with, by name; none: the base model")
    block_keys: list[int] | None = Field(
        None, max_length=1 << 20,
        description="the prompt's block keys at the replica's block size (services/kv_blocks.py), from the front's "
                    "router: the replica announces them as pending on /kv_events until its engine stores them or the "
                    "request ends")

    @model_validator(mode="after")
    def _keys_fit_the_prompt(self) -> GenerateRequest:
        if self.block_keys is not None and (len(self.block_keys) > len(self.token_ids)
                                            or any(not 0 <= key < 1 << 62 for key in self.block_keys)):
            raise ValueError("block_keys must be at most one key per prompt token, each in [0, 2**62)")
        return self


class TokenLogprobs(BaseModel):
    """Logprobs of one output token: the sampled one and the top alternatives (best first)."""

    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)


class GenerateDelta(BaseModel):
    """One frame of the reply: new tokens of one choice since the previous frame.

    The last frame of a choice has `finish_reason` set. Counts are cumulative so that the receiver
    never has to add them up.
    """

    index: int = 0
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = Field(None, description="the stop token id that ended the choice, if any")
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def followed_by(self, later: GenerateDelta) -> GenerateDelta:
        """This frame and the next one of the same choice as one frame (the counts are cumulative,
        so the later frame's hold for both; a request's frames all carry logprobs, or none do)."""
        return GenerateDelta.model_construct(
            index=self.index,
            token_ids=self.token_ids + later.token_ids,
            logprobs=None if self.logprobs is None else self.logprobs + (later.logprobs or []),
            finish_reason=later.finish_reason,
            stop_reason=later.stop_reason,
            prompt_tokens=later.prompt_tokens,
            completion_tokens=later.completion_tokens,
        )


class AdapterInfo(BaseModel):
    """A LoRA adapter the engine serves: what `/v1/models` lists for it (vLLM's card)."""

    name: str
    path: str
    parent: str


class ModelInfo(BaseModel):
    """What the front tier needs to know about the engine it talks to: its limits as the engine
    derived them (the setting, rope scaling, sliding windows), and the token ids it ends a
    generation on by itself (generation_config.json's EOS ids)."""

    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int] = Field(default_factory=list)
    adapters: list[AdapterInfo] = Field(default_factory=list, description="the LoRA adapters served now")
    # The engine's prefix cache, for routing (services/kv_blocks.py): None where prefix caching is off.
    kv_block_size: int | None = Field(None, ge=1, description="tokens per KV-cache block")
    kv_cache_blocks: int | None = Field(None, ge=0, description="blocks the engine's KV cache holds in all")
    kv_events: bool = Field(False, description="whether /kv_events streams the engine's own cache events")
    epoch: str | None = Field(None, description="this replica's start: another value means another engine, whose cache "
                                                "began empty (the front forgets what it knew of the replica)")


# --- LoRA adapters at run time (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter bodies) --


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


class AdapterUpdate(BaseModel):
    """What a load or unload did: vLLM's status, message and error type (None on success). The GPU
    tier answers 200 with this either way, so the front can pass vLLM's exact answer on."""

    status: int = 200
    message: str
    type: str | None = None


# --- a replica's KV cache, for routing (docs/architecture.md, "Routing") --------------------------


class ReplicaLoad(BaseModel):
    """How busy a replica's engine is, as the replica last measured it (over all its engine
    clients, so over every front worker and PromptService replica that sends it work)."""

    running: int = Field(0, ge=0, description="requests the engine is running")
    waiting: int = Field(0, ge=0, description="requests waiting in the engine's queue")
    kv_usage: float = Field(0.0, ge=0, le=1, description="the share of the KV cache's blocks in use")
    prefill_tokens: int = Field(0, ge=0, description="prompt tokens of the requests accepted and not yet prefilled "
                                                     "(no first token yet): the work queued ahead of a new request")


class CacheEvents(BaseModel):
    """One frame of LLMService's `/kv_events` stream: what its engine's prefix cache holds, as
    block keys (services/kv_blocks.py), and its load.

    The first frame of a stream is a snapshot: `cleared` and the replica's `epoch`, then every block
    held in `stored` and every pending one in `pending`; each later frame is the change since the one
    before, applied in order: `removed`, `stored`, `unpending`, `pending`, or, when `cleared`, a new
    snapshot (the engine dropped its blocks, or the replica's index started over). Pending blocks belong to requests the replica accepted and its engine has
    not stored yet: a router counts them as held. Every frame says whether the replica's own index
    is `degraded` (it may miss blocks the engine holds). A frame with only `load` is the engine's
    load, sent at least every second: a stream silent for longer is dead."""

    model_config = ConfigDict(extra="forbid")

    cleared: bool = False
    epoch: str | None = None
    removed: list[int] = Field(default_factory=list)
    stored: list[int] = Field(default_factory=list)
    unpending: list[int] = Field(default_factory=list)
    pending: list[int] = Field(default_factory=list)
    degraded: bool = False
    load: ReplicaLoad | None = None


# --- framing -----------------------------------------------------------------------------------

Frame = TypeVar("Frame", bound=BaseModel)


def encode_frame(frame: BaseModel) -> str:
    """One frame as one line of newline-delimited JSON (ASCII only: no character can be split)."""
    return frame.model_dump_json(exclude_defaults=True) + "\n"


class FrameDecoder(Generic[Frame]):
    """Reassembles frames of one type from transport chunks of any size and any boundary."""

    def __init__(self, frame: type[Frame]) -> None:
        self._frame = frame
        self._buffer = b""

    def feed(self, chunk: bytes | str) -> list[Frame]:
        if isinstance(chunk, str):
            chunk = chunk.encode()
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [self._frame.model_validate_json(line) for line in lines if line.strip()]

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished frame are waiting (a stream cut short)."""
        return bool(self._buffer.strip())


class DeltaDecoder(FrameDecoder[GenerateDelta]):
    """The frames of a `/generate` stream."""

    def __init__(self) -> None:
        super().__init__(GenerateDelta)
