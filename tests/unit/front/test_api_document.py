"""PromptService's OpenAPI document (/docs.json) is valid for the OpenAPI version it declares.

Built in-process the way the server builds it for /docs.json (`PromptService.openapi_spec`, then
JSON), without starting anything, and checked with openapi-spec-validator. The OpenAI routes,
mounted from FastAPI, must be in it with their schemas, and every `$ref` must resolve.
"""

from __future__ import annotations

import json

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from services.front.api_document import OPENAPI_VERSION
from services.front.prompt_service import PromptService

ROUTES = {"/generate", "/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
          "/livez", "/readyz", "/metrics"}


@pytest.fixture(scope="module")
def document() -> dict:
    # as BentoML's /docs.json view: JSONResponse(service.openapi_spec.asdict())
    return json.loads(json.dumps(PromptService.openapi_spec.asdict()))


def references(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def test_the_document_is_valid_for_the_version_it_declares(document):
    assert document["openapi"] == OPENAPI_VERSION
    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message[:300]}"
              for error in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []


def test_every_route_and_reference_is_there(document):
    assert set(document["paths"]) >= ROUTES
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "ChatCompletionResponse", "CompletionRequest", "CompletionResponse"):
        assert name in schemas
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    missing = {ref for ref in references(document) if ref.removeprefix("#/components/schemas/") not in schemas}
    assert missing == set()


def test_generate_keeps_its_bounds_in_the_declared_dialect(document):
    """/generate's strict lower bounds (top_p, repetition_penalty) stay numeric, as 3.1 writes them:
    the fields that made the 3.0.2 label invalid."""
    body = document["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = body["properties"]
    assert fields["top_p"]["exclusiveMinimum"] == 0.0 and fields["top_p"]["maximum"] == 1.0
    assert fields["repetition_penalty"]["exclusiveMinimum"] == 0.0
    assert fields["tokens"]["oneOf"][1] == {"type": "null"}


def test_the_validator_catches_what_the_old_label_got_wrong(document):
    """The same schemas labelled 3.0.2, as BentoML labels them, fail: the check can fail."""
    from openapi_spec_validator import OpenAPIV30SpecValidator

    with pytest.raises(OpenAPIValidationError):
        OpenAPIV30SpecValidator({**document, "openapi": "3.0.2"}).validate()
