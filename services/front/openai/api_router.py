"""The OpenAI-compatible HTTP routes: a FastAPI app that PromptService mounts at "/".

Routes only parse, call the handlers (serving.py, serving_chat.py, serving_completion.py) and shape
errors, as vLLM's api_router.py modules do; the paths are vLLM's. BentoML's passive mount claims only
these paths, so /generate, /readyz, /livez, /metrics and /docs.json stay BentoML's. Each worker sets
its own handler in `app.state.serving` (PromptService.__init__).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Annotated, Any, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Discriminator, Tag
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import RequestError
from services.front.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelList,
    ProtocolError,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from services.front.openai import serving_chat, serving_completion
from services.front.openai.serving import OpenAIServing, error_response
from services.protocol import AdapterUpdate, LoadAdapterRequest, UnloadAdapterRequest

ERRORS: dict[int | str, dict[str, Any]] = {
    status.value: {"model": ErrorResponse, "description": status.phrase}
    for status in (HTTPStatus.BAD_REQUEST, HTTPStatus.NOT_FOUND, HTTPStatus.SERVICE_UNAVAILABLE)
}
STREAM = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when `stream` is true"}}

TokenizeRequest = Annotated[
    Union[Annotated[TokenizeChatRequest, Tag("chat")], Annotated[TokenizeCompletionRequest, Tag("prompt")]],
    Discriminator(lambda body: "chat" if isinstance(body, dict) and "messages" in body else "prompt"),
]

app = FastAPI(
    title="OpenAI-compatible API",
    description="vLLM-compatible OpenAI endpoints of PromptService (docs/api.md).",
    docs_url=None,  # the service's own Swagger UI at / shows these routes
    redoc_url=None,
    openapi_url=None,
)


def serving(request: Request) -> OpenAIServing:
    handler = getattr(request.app.state, "serving", None)
    if handler is None:
        raise RequestError("the OpenAI routes are not ready yet", status=503)
    return handler


def json_error(error: RequestError) -> JSONResponse:
    body = error_response(error)
    headers = {"Retry-After": str(getattr(error, "retry_after_s"))} if hasattr(error, "retry_after_s") else None
    return JSONResponse(body.model_dump(), status_code=error.status, headers=headers)


# --- errors: OpenAI's body, vLLM's statuses ------------------------------------------------------


@app.exception_handler(RequestError)
async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    return json_error(error)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    """400 (vLLM's choice, where FastAPI says 422); a refused field names itself in `param`."""
    errors = error.errors()
    for item in errors:
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, ProtocolError):
            return json_error(RequestError(cause.message, param=cause.param))
    # vLLM's format (serve/exception_handling/handlers/validation.py): a count, then each error.
    param = ".".join(str(part) for part in errors[0]["loc"]) if errors and errors[0].get("loc") else None
    lines = [f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}:"]
    for item in errors[:10]:
        shown = {key: item[key] for key in ("type", "loc", "msg", "input") if key in item}
        shown["loc"] = ".".join(str(part) for part in shown.get("loc", ()))
        if isinstance(shown.get("input"), (dict, list)):
            shown["input"] = f"<{type(shown['input']).__name__} of {len(shown['input'])} items>"
        lines.append(f"  {str(shown)[:1000]}")
    body = ErrorResponse(error=ErrorInfo(message="\n".join(lines), type="Bad Request", param=param, code=400))
    return JSONResponse(body.model_dump(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    status = HTTPStatus(error.status_code)
    body = ErrorResponse(error=ErrorInfo(message=str(error.detail), type=status.phrase, code=status.value))
    return JSONResponse(body.model_dump(), status_code=status.value)


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, error: Exception) -> JSONResponse:
    """Anything else in OpenAI's body, never a bare text page. As in vLLM's fallback handlers, a
    ValueError, TypeError or OverflowError (such as a tokenizer refusing a lone surrogate) is the
    input's fault: 400; the rest is 500."""
    status = 400 if isinstance(error, (ValueError, TypeError, OverflowError)) else 500
    kind = "BadRequestError" if status == 400 else "InternalServerError"
    body = ErrorResponse(error=ErrorInfo(message=str(error) or type(error).__name__, type=kind, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def respond(result: Any) -> Any:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.model_dump())


# --- routes ----------------------------------------------------------------------------------------


@app.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**STREAM, **ERRORS},
    summary="Chat completion (OpenAI / vLLM compatible)",
    tags=["OpenAI"],
)
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
    result = await serving_chat.create_chat_completion(serving(raw_request), request, raw_request.headers.get("X-Request-Id"))
    return respond(result)


@app.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**STREAM, **ERRORS},
    summary="Text completion (OpenAI / vLLM compatible)",
    tags=["OpenAI"],
)
async def create_completion(request: CompletionRequest, raw_request: Request):
    result = await serving_completion.create_completion(serving(raw_request), request, raw_request.headers.get("X-Request-Id"))
    return respond(result)


@app.get("/v1/models", response_model=ModelList, summary="The served model and its LoRA adapters", tags=["OpenAI"])
async def show_available_models(raw_request: Request):
    return JSONResponse((await serving(raw_request).models()).model_dump())


# --- LoRA adapters at run time (vLLM's routes, only with PIPELINE_ALLOW_RUNTIME_LORA_UPDATING) -----


def adapter_response(update: AdapterUpdate) -> Response:
    """vLLM's answers: the message as a plain body on success, its error body otherwise."""
    if update.status == 200:
        return Response(update.message, status_code=200)
    body = ErrorResponse(error=ErrorInfo(message=update.message, type=update.type or "BadRequestError", code=update.status))
    return JSONResponse(body.model_dump(), status_code=update.status)


async def load_lora_adapter(request: LoadAdapterRequest, raw_request: Request):
    """Load a LoRA adapter on this replica (vLLM's /v1/load_lora_adapter); then it is served
    under `lora_name` in the `model` field."""
    return adapter_response(await serving(raw_request).update_adapter(request))


async def unload_lora_adapter(request: UnloadAdapterRequest, raw_request: Request):
    """Stop serving a LoRA adapter on this replica (vLLM's /v1/unload_lora_adapter)."""
    return adapter_response(await serving(raw_request).update_adapter(request))


def attach_lora_routes() -> None:
    """Serve the two routes (PromptService does when PIPELINE_ALLOW_RUNTIME_LORA_UPDATING is set, as
    vLLM attaches them only with VLLM_ALLOW_RUNTIME_LORA_UPDATING); again does nothing."""
    attached = {getattr(route, "path", None) for route in app.routes}
    for path, handler in (("/v1/load_lora_adapter", load_lora_adapter), ("/v1/unload_lora_adapter", unload_lora_adapter)):
        if path not in attached:
            app.post(path, responses={200: {"content": {"text/plain": {}}, "description": "a success message"}, **ERRORS},
                     summary=handler.__doc__.split(" (")[0], tags=["OpenAI"])(handler)


@app.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=ERRORS,
    summary="Token ids of a prompt or of a templated conversation (vLLM)",
    tags=["OpenAI"],
)
async def tokenize(request: TokenizeRequest, raw_request: Request):
    return JSONResponse(serving(raw_request).tokenize(request).model_dump())


@app.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses=ERRORS,
    summary="Text of token ids (vLLM)",
    tags=["OpenAI"],
)
async def detokenize(request: DetokenizeRequest, raw_request: Request):
    return JSONResponse(serving(raw_request).detokenize(request).model_dump())
