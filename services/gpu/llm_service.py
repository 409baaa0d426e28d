"""LLMService, the GPU tier: one vLLM engine, token ids in and token ids out.

It takes a `GenerateRequest` (services/protocol.py) and streams `GenerateDelta` frames of token ids;
it loads the tokenizer only to compile structured-output grammars, and checks what it receives
even though the front tier checked first. Only holders of the internal token may call it, and each
call owns the engine requests it starts (services/gpu/request_ownership.py).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from http import HTTPStatus

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable

from services.config import settings, stream_tracing
from services.connection import SpreadConnections
from services.gpu.draining import Drain
from services.gpu.engine_args import engine_args, kv_events_wanted
from services.gpu.engine_clients import EngineClientSlot, EngineLoad, begin_epoch, engine_epoch, start_engine_client
from services.gpu.engine_io import to_deltas, vllm_sampling_params
from services.gpu.engine_stats import EngineStats
from services.gpu.engine_watch import exit_when_engine_dies, launching_watched_engines, quiet_engine_stop
from services.gpu.kv_events import LOAD_EVERY_S, KvEventRelay
from services.gpu.kv_indexer import KvIndexerProcess
from services.gpu.lora import AdapterExists, AdapterRegistry, sanitize_message
from services.gpu.metrics import engine_metrics
from services.gpu.request_ownership import EngineRequestsPerCall, own_engine_request, release_engine_request
from services.model_store import adapter_reference, model_reference
from services.protocol import (
    AdapterInfo,
    AdapterUpdate,
    GenerateRequest,
    LoadAdapterRequest,
    ModelInfo,
    ReplicaLoad,
    UnloadAdapterRequest,
    encode_frame,
)
from services.run_dir import own_run_dir, share_run_dir
from services.security import BearerAuthMiddleware, JsonOnlyMiddleware

logger = logging.getLogger("bentoml.service.llm")


def _input_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses: ValueError, and its VLLMValidationError (not a
    ValueError in newer vLLM), raised for instance by a JSON schema or regex it cannot compile."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMValidationError)


# In the serving process, before it starts the workers: the replica's run directory (engine
# sockets, KV events, shared counters) and its own Prometheus folder in it (services/run_dir.py).
own_run_dir()


@bentoml.service(
    name="LLMService",
    resources={"gpu": settings.tensor_parallel_size},
    # one engine-client process per worker, all on one engine (services/gpu/engine_clients.py)
    workers=settings.engine_client_count,
    # The front's deadline (request_timeout_s) ends a request first; BentoML's timeout is a backstop.
    # BentoML's own cap (429) is a backstop above the engine cap checked in `generate`.
    traffic={
        "timeout": settings.request_timeout_s + 30,
        "concurrency": 4096,
        "max_concurrency": settings.max_engine_requests + 64 if settings.max_engine_requests else None,
    },
    # OpenTelemetry opens a span for every send of a streamed response: 80 of the 94 us of CPU
    # each frame cost this one process (docs/benchmarks.md).
    tracing=stream_tracing("/generate", "/kv_events"),
    labels={"tier": "gpu"},
)
class LLMService:
    model = model_reference(settings.model)

    def __init__(self) -> None:
        from vllm import AsyncLLMEngine
        from vllm.usage.usage_lib import UsageContext

        # The usage context picks the scheduler's defaults: `vllm serve`'s (on an H100: up to 1024
        # sequences and 8192 tokens a step), not the bare engine's (128 and 2048).
        usage = UsageContext.OPENAI_API_SERVER
        quiet_engine_stop()  # an EngineCore that stops with the replica is no fault in the log
        self.run_dir = share_run_dir()
        count = settings.engine_client_count
        slot = EngineClientSlot.of_this_worker(count) if count > 1 else None
        # the engine's scheduler stats, shared by the workers (the load frames of /kv_events)
        self.engine_stats = EngineStats(self.run_dir, count, slot.index if slot else 0)
        stat_loggers = [self.engine_stats.stat_logger()]
        launches_engine = slot is None or slot.launches_engine
        if launches_engine:  # this engine's epoch, before it exists (the other workers read it once it greets them)
            self.epoch = begin_epoch(self.run_dir)
        if slot is None:
            with launching_watched_engines():  # the engine goes when this worker does
                self.engine = AsyncLLMEngine.from_engine_args(engine_args(settings), usage_context=usage,
                                                              stat_loggers=stat_loggers)
            exit_when_engine_dies(self.engine)  # and this worker when its engine does
        else:
            self.engine = start_engine_client(engine_args(settings), slot, usage, settings.engine_start_timeout_s,
                                              stat_loggers=stat_loggers)
        if not launches_engine:
            self.epoch = engine_epoch(self.run_dir)
        self.engine_load = EngineLoad(slot)
        # SIGTERM: finish what is under way (worker 1 owns the engine: all of it), take nothing new
        self.drain = Drain(self.engine_load.total if launches_engine else lambda: self.engine_load.own,
                           timeout_s=settings.drain_timeout_s)
        self.input_errors = _input_errors()
        from vllm.v1.engine.exceptions import EngineDeadError  # its engine client's, once the EngineCore is gone

        self.engine_dead_error = EngineDeadError
        model_config = self.engine.model_config
        cache_config = self.engine.vllm_config.cache_config
        prefix_caching = bool(cache_config.enable_prefix_caching)
        self.block_size = cache_config.block_size
        self.kv_relay: KvEventRelay | None = None  # made on start-up, on the event loop
        self.info = ModelInfo(
            model=settings.model_name,
            max_model_len=model_config.max_model_len,
            vocab_size=model_config.get_vocab_size(),
            eos_token_ids=self._eos_token_ids(),
            kv_block_size=cache_config.block_size if prefix_caching else None,
            kv_cache_blocks=cache_config.num_gpu_blocks if prefix_caching else None,
            kv_events=prefix_caching and kv_events_wanted(settings),
            epoch=self.epoch,
        )
        # LoRA adapters by name (None without LoRA: nothing of it on a request's path)
        self.adapters = AdapterRegistry(settings.lora_modules, settings.lora_registry_path) if settings.lora_enabled else None
        # the replica's one KV indexer (services/gpu/kv_indexer.py), started with the engine, by its worker
        self.kv_indexer = None
        if self.info.kv_events and launches_engine:
            self.kv_indexer = KvIndexerProcess(
                self.run_dir, self.epoch, self.info.kv_cache_blocks,
                pending_ttl_s=settings.request_timeout_s + 60,  # a request's end never heard of (BentoML's own cap: +30)
                adapters=self.adapters.path if self.adapters is not None else None,
                may_restart=lambda: not self.drain.draining,
            ).start()
        engine_metrics()  # created now, so they read 0 rather than being absent until first used
        logger.info("engine ready: %s", self.info)

    @bentoml.on_startup
    async def load_configured_adapters(self) -> None:
        """Load each configured adapter now, as `vllm serve --lora-modules` does: a bad one stops
        the start with its reason instead of failing the first request that names it."""
        for adapter in self.adapters.adapters() if self.adapters is not None else []:
            try:
                await self.engine.add_lora(self._lora_request(adapter.name))
            except Exception as error:
                raise RuntimeError(f"LoRA adapter {adapter.name!r} ({adapter.path}) could not be loaded: {error}") from error
            logger.info("LoRA adapter %r loaded from %s (id %d)", adapter.name, adapter.path, adapter.id)

    @bentoml.on_startup
    async def start_serving(self) -> None:
        """Before the worker says ready: take over SIGTERM (drain), and follow the replica's KV
        indexer for the /kv_events streams."""
        self.drain.install()
        if self.info.kv_events:
            self.kv_relay = KvEventRelay(self.run_dir, self.epoch, self.replica_load, worker=self.engine_load.index).start()

    async def __is_ready__(self) -> bool:
        return not self.engine.errored and not self.drain.draining

    async def __is_alive__(self) -> bool:
        return not self.engine.errored

    @bentoml.api
    async def model_info(self) -> ModelInfo:
        """The served model's name, context length, vocabulary size and EOS ids, and the LoRA
        adapters it serves now."""
        if self.adapters is None:
            return self.info
        adapters = [AdapterInfo(name=a.name, path=a.path, parent=a.base_model_name or self.info.model)
                    for a in self.adapters.adapters()]
        return self.info.model_copy(update={"adapters": adapters})

    @bentoml.api
    async def generate(self, request: GenerateRequest) -> AsyncGenerator[str, None]:
        """Stream GenerateDelta frames (newline-delimited JSON) for a tokenized prompt."""
        self._check(request)
        if self.engine.errored:
            raise ServiceUnavailable("the engine has stopped; the service is restarting")
        if self.drain.draining:
            raise ServiceUnavailable("this replica is stopping; send the request to another")
        cap = settings.max_engine_requests
        if cap is not None and self.engine_load.total() >= cap:
            engine_metrics().refused.inc()
            raise BentoMLException(
                f"the engine holds its limit of {cap} requests (PIPELINE_MAX_ENGINE_REQUESTS); try again shortly",
                error_code=HTTPStatus.TOO_MANY_REQUESTS,
            )
        from vllm.inputs.engine import tokens_input

        # An engine input (what vLLM's own server hands over after its renderer), not a raw
        # TokensPrompt: newer vLLM sends raw prompts through a thread pool for preprocessing, a
        # thread hop on every request's way to its first token.
        stream = self.engine.generate(
            tokens_input(request.token_ids),
            vllm_sampling_params(request),
            request_id=request.request_id,
            lora_request=self._lora_request(request.adapter) if request.adapter is not None else None,
        )
        completed: dict[int, int] = {}
        prompt_tokens = len(request.token_ids)
        own_engine_request(request.request_id, self.engine.abort)
        self.engine_load.add(+1, prefill_tokens=prompt_tokens)
        prefilling = True
        # the prompt's blocks are pending on /kv_events until the engine stores them or the request ends
        announced = bool(request.block_keys) and self.kv_relay is not None
        if announced:
            self.kv_relay.pending(request.request_id, request.block_keys)
        try:
            async for output in stream:
                if prefilling:
                    prefilling = False
                    self.engine_load.add(0, prefill_tokens=-prompt_tokens)
                if output.finished:
                    release_engine_request(request.request_id)
                yield "".join(encode_frame(d) for d in to_deltas(output, prompt_tokens, completed))
        except self.input_errors as error:  # vLLM's own input checks (grammars too), raised before the first output
            release_engine_request(request.request_id)
            raise InvalidArgument(str(error)) from error
        except self.engine_dead_error as error:
            # The engine died after the check above, before this worker's watch saw it (it exits
            # then: services/gpu/engine_watch.py). Not the request's fault and not a bug here: the
            # replica is restarting, so 503, which the front answers as "not ready" (or retries on
            # another replica), never a 500 (which the front reports as 502).
            release_engine_request(request.request_id)
            raise ServiceUnavailable("the engine has stopped; the service is restarting") from error
        finally:
            self.engine_load.add(-1, prefill_tokens=-prompt_tokens if prefilling else 0)
            if announced:
                self.kv_relay.done(request.request_id)

    @bentoml.api
    async def load_lora_adapter(self, request: LoadAdapterRequest) -> AdapterUpdate:
        """Load a LoRA adapter into the engine (vLLM's /v1/load_lora_adapter: its checks, statuses
        and messages), and serve it under its name from every worker of this replica. The outcome,
        an error included, comes back as a 200 carrying the status for the client."""
        if not settings.allow_runtime_lora_updating or self.adapters is None:
            return AdapterUpdate(status=404, message="Not Found", type="NotFoundError")
        name, path = request.lora_name, request.lora_path
        if not name or not path:
            return AdapterUpdate(status=400, message="Both 'lora_name' and 'lora_path' must be provided.",
                                 type="InvalidUserInput")
        if name == self.info.model:
            return AdapterUpdate(status=400, message=f"The lora adapter '{name}' conflicts with a served base model.",
                                 type="InvalidUserInput")
        from vllm.exceptions import LoRAAdapterNotFoundError
        from vllm.lora.request import LoRARequest

        try:
            adapter = self.adapters.reserve(name, path, inplace=request.load_inplace)
            # eager, so that a bad folder or rank is refused here (requests load it lazily, from
            # its path, in an engine that evicted it since)
            await self.engine.add_lora(LoRARequest(lora_name=name, lora_int_id=adapter.id, lora_path=adapter.path,
                                                   load_inplace=request.load_inplace))
            self.adapters.commit(adapter, inplace=request.load_inplace)
        except AdapterExists:
            return AdapterUpdate(status=400, type="InvalidUserInput", message=(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True."))
        except Exception as error:
            not_found = str(LoRAAdapterNotFoundError(name, path))
            if not_found in str(error):
                return AdapterUpdate(status=404, message=sanitize_message(not_found), type="NotFoundError")
            # vLLM's server answers 500 here (a rank over the maximum, a folder that is not an
            # adapter); it is the request's fault, and the engine goes on serving: 400
            logger.warning("LoRA adapter %r (%s) refused: %s", name, path, error)
            return AdapterUpdate(status=400, message=sanitize_message(str(error)), type="BadRequestError")
        logger.info("LoRA adapter %r loaded from %s (id %d)", name, adapter.path, adapter.id)
        return AdapterUpdate(message=f"Success: LoRA adapter '{name}' added successfully.")

    @bentoml.api
    async def unload_lora_adapter(self, request: UnloadAdapterRequest) -> AdapterUpdate:
        """Stop serving a LoRA adapter (vLLM's /v1/unload_lora_adapter). As in vLLM, the engine
        keeps its weights until its cache evicts them, so requests already running on it finish."""
        if not settings.allow_runtime_lora_updating or self.adapters is None:
            return AdapterUpdate(status=404, message="Not Found", type="NotFoundError")
        if not request.lora_name:
            return AdapterUpdate(status=400, message="'lora_name' needs to be provided to unload a LoRA adapter.",
                                 type="InvalidUserInput")
        try:
            self.adapters.remove(request.lora_name)
        except KeyError:
            return AdapterUpdate(status=404, message=f"The lora adapter '{request.lora_name}' cannot be found.",
                                 type="NotFoundError")
        logger.info("LoRA adapter %r unloaded", request.lora_name)
        return AdapterUpdate(message=f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    @bentoml.api
    async def kv_events(self) -> AsyncGenerator[str, None]:
        """The replica's prefix cache as block keys (services/kv_blocks.py): a stream of CacheEvents
        frames, one JSON line each: a snapshot (cleared, the epoch, every key held and pending),
        then each change, and the engine's load at least every second (services/gpu/kv_events.py).
        The stream ends when its caller leaves, or the replica stops."""
        if self.kv_relay is None:
            raise BentoMLException("KV cache events are off on this replica (PIPELINE_KV_EVENTS, or prefix "
                                   "caching off); see /model_info's kv_events", error_code=HTTPStatus.NOT_FOUND)
        if self.drain.draining:
            raise ServiceUnavailable("this replica is stopping")
        stream = self.kv_relay.open()
        try:
            while not self.drain.draining and not self.engine.errored:
                chunk = await stream.take(LOAD_EVERY_S)
                if chunk:
                    yield chunk  # the indexer's bytes as they are (BentoML sends bytes unchanged)
        finally:
            self.kv_relay.close(stream)

    def replica_load(self) -> ReplicaLoad:
        """The engine's load for the front's routers: how many requests it holds, exactly (its
        workers count each from its start to its end: EngineLoad, and the prompt tokens of those
        with no output yet), split into running and waiting by the scheduler's last stats, which
        also give the KV usage. The stats alone would mislead:
        they come with a step's outputs, so they lag the requests just sent, and when the engine
        goes idle the last step's counts stay (an idle replica would look busy, and a router that
        goes by them would never send it the request that refreshes them)."""
        stats, held = self.engine_stats.latest(), self.engine_load.total()
        if held <= 0:
            return ReplicaLoad()
        waiting = min(stats.waiting, held)
        return ReplicaLoad(running=held - waiting, waiting=waiting, kv_usage=stats.kv_usage,
                           prefill_tokens=max(self.engine_load.prefill_tokens(), 0))

    @bentoml.api
    async def reset_prefix_cache(self) -> dict[str, bool]:
        """Empty the engine's prefix cache (vLLM's POST /reset_prefix_cache, which `vllm serve`
        offers only with VLLM_SERVER_DEV_MODE): benchmarks start each run cold with it. The engine
        refuses (`success` false) while running requests hold blocks; the front's routers learn of
        a reset from /kv_events (a `cleared` frame).

        vLLM publishes the `AllBlocksCleared` event it queued at its next step, and an idle engine
        takes none: the workers' indexes (and the fronts) would hold the old blocks until the next
        request. So a reset then runs one step of a request shorter than a block (one token in,
        one out: nothing cached, nothing reported), which publishes it now."""
        success = bool(await self.engine.reset_prefix_cache())
        if success and self.kv_relay is not None:
            from vllm import SamplingParams
            from vllm.inputs.engine import tokens_input
            from vllm.sampling_params import RequestOutputKind

            params = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.DELTA)
            async for _ in self.engine.generate(tokens_input([0]), params, request_id=f"reset-{uuid.uuid4().hex}"):
                pass
        return {"success": success}

    @bentoml.api
    async def load(self) -> dict[str, int]:
        """Requests the engine holds now (running or waiting), over all its engine clients, and
        which engine client (worker) answered."""
        return {"unfinished_requests": self.engine_load.total(), "engine_client": self.engine_load.index + 1}

    def _eos_token_ids(self) -> list[int]:
        """The ids the engine ends a generation on by itself: its tokenizer's EOS (it has one, for
        grammars) and generation_config.json's."""
        configured = self.engine.model_config.try_get_generation_config().get("eos_token_id")
        ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return ids

    def _lora_request(self, name: str):
        """vLLM's LoRARequest for the adapter served as `name` (404 when there is none)."""
        adapter = self.adapters.get(name) if self.adapters is not None else None
        if adapter is None:
            raise BentoMLException(f"The model `{name}` does not exist.", error_code=HTTPStatus.NOT_FOUND)
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.id, lora_path=adapter.path,
                           base_model_name=adapter.base_model_name)

    def _check(self, request: GenerateRequest) -> None:
        limit, vocab = self.info.max_model_len, self.info.vocab_size
        prompt_tokens, max_tokens = len(request.token_ids), request.sampling_params.max_tokens
        if prompt_tokens + max_tokens > limit:
            raise InvalidArgument(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{prompt_tokens + max_tokens} tokens, over the model's context length of {limit}"
            )
        bad = [token for token in request.token_ids if not 0 <= token < vocab]
        if bad:
            raise InvalidArgument(f"token ids must be in [0, {vocab}); got {bad[:5]}")
        bad_stop = [token for token in request.sampling_params.stop_token_ids if not 0 <= token < vocab]
        if bad_stop:
            raise InvalidArgument(f"stop_token_ids must be in [0, {vocab}); got {bad_stop[:5]}")
        if request.block_keys is not None and len(request.block_keys) > prompt_tokens // self.block_size:
            raise InvalidArgument(
                f"block_keys has {len(request.block_keys)} keys, more than the prompt's "
                f"{prompt_tokens // self.block_size} full blocks ({prompt_tokens} tokens, {self.block_size} a block)"
            )


# `bentoml build` packs the adapters that come from the model store, as it packs the model.
LLMService.models.extend(
    reference for module in settings.lora_modules
    if (reference := adapter_reference(module.path)) is not None
)

# Outermost first: a generation's connection ended after it (several engine clients), who is
# calling (401), what they send (415), then the call's engine requests.
if settings.spread_connections and settings.engine_client_count > 1:
    LLMService.add_asgi_middleware(SpreadConnections, paths=frozenset({"/generate"}))
LLMService.add_asgi_middleware(BearerAuthMiddleware, keys=[settings.internal_token.get_secret_value()],
                               what="the internal token (PIPELINE_INTERNAL_TOKEN)")
LLMService.add_asgi_middleware(JsonOnlyMiddleware)
LLMService.add_asgi_middleware(EngineRequestsPerCall)
