"""One generation request's life in the front tier, owned by one object (`InflightRequest`).

The admission middleware makes it when the request enters the worker and closes it when the ASGI
call ends, whatever the reason. Everything that must end with the request hangs off it: its charge
of engine sequences, its deadline, its GPU-tier streams (closing one aborts its engine request)
and why it ended early (docs/architecture.md, "Reaching LLMService").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextvars import ContextVar

from services.errors import DeadlineExceeded, Overloaded, RequestError
from services.front.llm_client import LLMClient
from services.front.metrics import front_metrics
from services.protocol import GenerateDelta, GenerateRequest

_current: ContextVar[InflightRequest | None] = ContextVar("inflight_request", default=None)


class SequenceBudget:
    """The engine sequences one front worker may hold at once (`PIPELINE_MAX_INFLIGHT_SEQUENCES`)."""

    def __init__(self, limit: int | None, *, per_request: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.per_request = per_request
        self.retry_after_s = retry_after_s
        self.in_use = 0

    def take(self, sequences: int) -> None:
        if sequences > self.per_request:
            raise RequestError(
                f"this request would start {sequences} sequences (prompts x n); the most one request may start "
                f"is {self.per_request} (PIPELINE_MAX_SEQUENCES_PER_REQUEST): send fewer prompts or a smaller n",
                param="n",
            )
        if self.limit is not None and self.in_use + sequences > self.limit:
            raise Overloaded(
                f"this server is at its limit of {self.limit} sequences in flight per worker "
                f"(PIPELINE_MAX_INFLIGHT_SEQUENCES; {self.in_use} in use, this request needs {sequences}); "
                f"try again in {self.retry_after_s} s",
                retry_after_s=self.retry_after_s,
            )
        self.in_use += sequences

    def give_back(self, sequences: int) -> None:
        self.in_use -= sequences


class InflightRequest:
    def __init__(self, budget: SequenceBudget, *, timeout_s: float, max_streams: int) -> None:
        self.budget = budget
        self.timeout_s = timeout_s
        self.charged = 0
        self.deadline: float | None = None  # event-loop time, set at admission
        self.client_left = False
        self.refusal: RequestError | None = None  # a refusal whose message BentoML would mask
        self.broken: RequestError | None = None  # a failure after the response started
        self._slots = asyncio.Semaphore(max_streams)

    # --- the request's life ---------------------------------------------------------------------

    @staticmethod
    def current() -> InflightRequest:
        life = _current.get()
        if life is None:
            raise RuntimeError("no generation request in flight here: requests enter through AdmissionMiddleware")
        return life

    def enter(self):
        return _current.set(self)

    @staticmethod
    def leave(token) -> None:
        _current.reset(token)

    def admit(self, sequences: int) -> None:
        """Charge the engine sequences this request starts; 400 over the per-request cap, 429 over
        the worker's budget. The deadline starts here."""
        self.budget.take(sequences)
        self.charged += sequences
        if self.deadline is None:
            self.deadline = asyncio.get_running_loop().time() + self.timeout_s

    def mark_client_left(self) -> None:
        """The client went away; the middleware is cancelling the route, and its streams with it."""
        self.client_left = True

    def close(self) -> None:
        self.budget.give_back(self.charged)
        self.charged = 0

    # --- its streams ------------------------------------------------------------------------------

    async def stream(self, llm: LLMClient, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """The GPU tier's frames for one prompt, within this request's deadline and stream bound."""
        if self.deadline is None:
            raise RuntimeError("stream() before admit(): the request was not charged")
        finished = 0
        async with self._slots:
            try:
                async for delta in llm.generate(request, deadline=self.deadline, timeout_s=self.timeout_s):
                    if delta.finish_reason is not None:
                        finished += 1
                    yield delta
                if finished < request.sampling_params.n:
                    raise RequestError("the GPU tier's stream ended before the generation finished", status=503)
            except DeadlineExceeded:
                front_metrics().aborted.labels("deadline").inc()
                raise
            except RequestError as error:
                if error.status >= 500:
                    front_metrics().aborted.labels("gpu_tier").inc()
                raise
            except (GeneratorExit, asyncio.CancelledError):
                if self.client_left and finished < request.sampling_params.n:
                    front_metrics().aborted.labels("client_left").inc()
                raise

    # --- how it ends ------------------------------------------------------------------------------

    def note_refusal(self, error: RequestError) -> None:
        """Keep a refusal's message for the middleware, which puts it back into the 5xx body that
        BentoML would mask ("An unexpected error has occurred")."""
        self.refusal = error

    def break_response(self, error: RequestError) -> None:
        """The response started and cannot carry an error: end it without its last chunk, so that
        the client sees a cut stream (the BentoML and HTTP clients raise), not a complete one."""
        self.broken = error
