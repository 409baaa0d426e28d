"""PromptService, the CPU tier and the entry service: the HTTP API, and all text work.

Routes only parse, call `TextGeneration` and shape errors. The GPU tier is reached through
`bentoml.depends(LLMService)`, so `bentoml serve` starts both, and in a deployment each tier
scales on its own.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Annotated

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import Field

from services.config import settings, stream_tracing
from services.errors import RequestError
from services.connection import SpreadConnections
from services.front.admission import GENERATION_PATHS, AdmissionMiddleware
from services.front.api_document import OpenAPI31Service
from services.front.generation import TextGeneration, TextOptions
from services.front.health import TierMonitor
from services.front.inflight import InflightRequest, SequenceBudget
from services.front.llm_client import LLMClient
from services.front.metrics import front_metrics
from services.front.openai.api_router import app as openai_app
from services.front.openai.api_router import attach_lora_routes
from services.front.openai.serving import OpenAIServing
from services.front.text.templates import ChatFormatter, load_chat_template
from services.front.text.tokenizer import load_tokenizer
from services.gpu.llm_service import LLMService
from services.model_store import model_reference, sampling_defaults
from services.protocol import StructuredOutputs
from services.run_dir import own_run_dir
from services.security import BearerAuthMiddleware

logger = logging.getLogger("bentoml.service.prompt")

# In the serving process: this server's own Prometheus folder, so that another server on the host
# with the same BentoML home does not wipe its metrics (services/run_dir.py).
own_run_dir()

SEED_PROMPT = "Explain superconductors like I'm five years old"


if settings.allow_runtime_lora_updating:  # /v1/load_lora_adapter, /v1/unload_lora_adapter
    attach_lora_routes()


def _one_of(schema: dict) -> None:
    """Publish a union as `oneOf`: BentoML's schema keeps only the first `anyOf` branch, and its
    client then fails to send `tokens=None`, the seed's own call."""
    schema["oneOf"] = schema.pop("anyOf")


NullableTokens = Annotated[list[int] | None, Field(json_schema_extra=_one_of, description="token ids, or null")]
StopStrings = Annotated[str | list[str] | None, Field(json_schema_extra=_one_of, description="one stop string or a list")]


def as_bentoml_error(error: RequestError) -> BentoMLException:
    """BentoML's exception with the same status; a 5xx message is noted for the admission
    middleware, which puts it back into the body BentoML masks."""
    if error.status == 400:
        return InvalidArgument(error.message)
    from http import HTTPStatus

    InflightRequest.current().note_refusal(error)
    return BentoMLException(error.message, error_code=HTTPStatus(error.status))


# Whether the GPU tier is ready, checked in the background; one per worker. One GPU tier at the address
# bentoml.depends gives (services/front/health.py), or, with PIPELINE_GPU_TIER_REPLICAS, a set of replicas
# each checked on its own (services/front/routing/replicas.py; a malformed setting: not ready, with the reason).
if settings.gpu_tier_replicas is None:
    gpu_tier = TierMonitor("LLMService", interval_s=settings.tier_check_interval_s, retry_after_s=settings.retry_after_s)
else:
    from services.front.routing.discovery import source_of
    from services.front.routing.replicas import ReplicaSet

    gpu_tier = ReplicaSet(
        source_of(settings.gpu_tier_replicas, service=LLMService),
        token=settings.internal_token.get_secret_value(), timeout_s=settings.request_timeout_s,
        refresh_s=settings.gpu_tier_refresh_s, check_interval_s=settings.tier_check_interval_s,
        retry_after_s=settings.retry_after_s, sync_adapters=settings.allow_runtime_lora_updating,
    )


def replica_router():
    """The front's client of a GPU tier of several replicas (services/front/routing/router.py)."""
    from services.front.routing.policy import Weights, make_policy
    from services.front.routing.router import ReplicaRouter

    weights = Weights(load_weight=settings.routing_load_weight, kv_saturation=settings.routing_kv_saturation,
                      queue_saturation=settings.routing_queue_saturation, home_tokens=settings.routing_home_tokens,
                      imbalance_requests=settings.routing_imbalance_requests,
                      imbalance_ratio=settings.routing_imbalance_ratio)
    return ReplicaRouter(gpu_tier, make_policy(settings.routing, weights))


@bentoml.asgi_app(openai_app, path="/")  # /v1/*, /tokenize, /detokenize (services/front/openai/api_router.py)
@bentoml.service(
    name="PromptService",
    workers=settings.prompt_workers,
    resources={"cpu": "1"},
    # The deadline (request_timeout_s) ends a request first; BentoML's timeout is a backstop.
    # Admission (services/front/admission.py, services/front/inflight.py) caps the engine sequences in flight, with Retry-After.
    traffic={"timeout": settings.request_timeout_s + 30, "concurrency": 4096},
    # /readyz is __is_ready__ alone (the GPU tier as the front routes to it). BentoML's own probe of
    # the --depends URL adds nothing, and while that URL refuses connections it holds /readyz
    # until the traffic timeout, and a stop behind it until SIGKILL.
    runner_probe={"enabled": False},
    # no span per streamed chunk (docs/benchmarks.md)
    tracing=stream_tracing("/generate", "/v1/chat/completions", "/v1/completions"),
    labels={"tier": "cpu"},
    service_class=OpenAPI31Service,  # /docs.json declares the OpenAPI version its schemas follow
)
class PromptService:
    llm = bentoml.depends(LLMService)
    model = model_reference(settings.model)

    def __init__(self) -> None:
        front_metrics()  # created now, so they read 0 rather than being absent until first used
        self.engine_info = None
        tokenizer = load_tokenizer(settings.model_path)
        template = load_chat_template(settings.chat_template, tokenizer.chat_template)
        if isinstance(gpu_tier, TierMonitor):
            self.llm_client = LLMClient(
                self.llm.to_async.url, token=settings.internal_token.get_secret_value(),
                timeout_s=settings.request_timeout_s, monitor=gpu_tier,
            )
        else:
            self.llm_client = replica_router()
        self.generation = TextGeneration(
            tokenizer=tokenizer,
            formatter=ChatFormatter(tokenizer, template),
            llm=self.llm_client,
            context_length=settings.context_length,
            vocab_size=int(settings.hf_config["vocab_size"]),
            default_max_tokens=settings.default_max_tokens,
        )
        model_defaults = sampling_defaults(settings.model_path) if settings.generation_config == "auto" else {}
        if model_defaults:
            logger.info("OpenAI requests default to the model's generation_config.json: %s "
                        "(PIPELINE_GENERATION_CONFIG=vllm for vLLM's defaults)", model_defaults)  # fmt: skip
        parsing = None
        if settings.enable_auto_tool_choice or settings.reasoning_parser:
            from services.front.openai.parsing import ChatParsing

            parsing = ChatParsing(
                tokenizer,
                enable_auto_tools=settings.enable_auto_tool_choice,
                tool_parser=settings.tool_call_parser,
                tool_parser_plugin=settings.tool_parser_plugin,
                reasoning_parser=settings.reasoning_parser,
            )
        self.serving = OpenAIServing(
            self.generation, model_name=settings.model_name, model_root=settings.model,
            sampling_defaults=model_defaults, parsing=parsing,
            # adapters loaded at run time may come through another worker: ask before a 404
            refresh_models=self.refresh_models if settings.allow_runtime_lora_updating else None,
        )
        openai_app.state.serving = self.serving

    @bentoml.on_startup
    async def watch_gpu_tier(self) -> None:
        if isinstance(gpu_tier, TierMonitor):
            gpu_tier.watch(self.llm_client.is_ready, on_ready=self.learn_engine)
        else:
            gpu_tier.start(on_ready=self.learn_engine)

    async def learn_engine(self) -> None:
        """Each time the GPU tier comes up: its engine's limits and EOS ids (services/front/generation.py)."""
        info = await self.llm_client.model_info()
        if info != self.engine_info:
            logger.info("GPU tier serves %s", info)
            self.engine_info = info
        self.generation.use_engine(info)
        self.serving.use_engine(info)

    async def refresh_models(self) -> None:
        """The GPU tier's adapters now (after a load or unload, or for a name not known here)."""
        try:
            info = await self.llm_client.model_info()
        except Exception as error:  # the request goes on with what is known; the tier monitor sees outages
            logger.warning("could not refresh the GPU tier's model info: %r", error)
            return
        self.engine_info = info
        self.serving.use_engine(info)

    async def __is_ready__(self) -> bool:
        return gpu_tier.ready

    @bentoml.on_shutdown
    async def close(self) -> None:
        await gpu_tier.stop()
        await self.llm_client.close()

    @bentoml.api
    async def generate(
        self,
        prompt: str = SEED_PROMPT,
        tokens: NullableTokens = None,
        max_tokens: Annotated[int | None, Field(ge=1)] = None,
        temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0,
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0,
        top_k: Annotated[int, Field(ge=-1)] = 0,
        min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0,
        seed: int | None = None,
        stop: StopStrings = None,
        stop_token_ids: list[int] | None = None,
        presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0,
        frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0,
        repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0,
        min_tokens: Annotated[int, Field(ge=0)] = 0,
        ignore_eos: bool = False,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        structured_outputs: StructuredOutputs | None = None,
        model: str | None = None,
        adapter: str | None = None,
    ) -> AsyncGenerator[str, None]:
        """Stream the model's answer to `prompt`, rendered with the chat template.

        `tokens`, an already tokenized prompt, is sent as it is (no template). Sampling fields and
        their defaults are vLLM's; `structured_outputs` (vLLM's: json, regex, choice, grammar,
        json_object or structural_tag) constrains the text. `model` (or `adapter`) names a LoRA adapter
        the GPU tier serves (404 for an unknown name); unset, or the base model's name: the base model. Errors before the first chunk are HTTP
        4xx/5xx with the reason; an error after it cuts the stream short (no final chunk), so clients
        raise instead of taking the text as complete.
        """
        started = False
        try:
            if model is not None and adapter is not None and model != adapter:
                raise RequestError("give the adapter's name as `model` or as `adapter`, not two names", param="adapter")
            lora = await self.serving.adapter_for(adapter or model)
            if tokens is not None:
                token_ids = self.generation.token_prompt(tokens)
            else:
                token_ids = self.generation.chat_prompt([{"role": "user", "content": prompt}])
            params = self.generation.sampling_params(
                len(token_ids),
                max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                seed=seed,
                stop_token_ids=stop_token_ids or [],
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
                repetition_penalty=repetition_penalty,
                min_tokens=min_tokens,
                ignore_eos=ignore_eos,
                structured_outputs=structured_outputs,
            )
            self.generation.admit(params.n)
            options = TextOptions(
                stop=[stop] if isinstance(stop, str) else (stop or []),
                include_stop_str_in_output=include_stop_str_in_output,
                skip_special_tokens=skip_special_tokens,
            )
            async for chunk in self.generation.stream(token_ids, params, options, adapter=lora):
                if chunk.text:
                    started = True
                    yield chunk.text
        except RequestError as error:
            if not started:
                raise as_bentoml_error(error) from error
            # The status line is sent and plain text has no error frame: the admission middleware
            # ends the response without its last chunk (docs/operations.md).
            InflightRequest.current().break_response(error)


# The front door, outermost first: a generation's connection ended after it (several workers), API
# keys (when configured), then admission (body size, GPU tier readiness, each request's life).
# BentoML's request metrics wrap them all, so refusals are counted.
if settings.spread_connections and settings.prompt_workers != 1:
    PromptService.add_asgi_middleware(SpreadConnections, paths=GENERATION_PATHS)
if settings.api_keys:
    PromptService.add_asgi_middleware(BearerAuthMiddleware, keys=settings.api_keys)
PromptService.add_asgi_middleware(
    AdmissionMiddleware,
    max_body_bytes=settings.max_body_bytes,
    budget=SequenceBudget(settings.max_inflight_sequences, per_request=settings.max_sequences_per_request,
                          retry_after_s=settings.retry_after_s),
    tier=gpu_tier,
    timeout_s=settings.request_timeout_s,
    max_streams_per_request=settings.max_streams_per_request,
    retry_after_s=settings.retry_after_s,
)
