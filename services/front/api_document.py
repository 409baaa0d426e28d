"""The OpenAPI document PromptService serves at /docs.json, labelled with the version it is written in.

Its schemas are JSON Schema 2020-12 as pydantic writes them (OpenAPI 3.1's dialect), yet BentoML 1.4
labels the merged document 3.0.2, which validators and client generators then reject: so it is
declared 3.1.0. tests/unit/front/test_api_document.py checks it with openapi-spec-validator.
"""

from __future__ import annotations

import typing as t

import bentoml
from _bentoml_sdk.service.openapi import generate_spec

OPENAPI_VERSION = "3.1.0"


class OpenAPI31Service(bentoml.Service[t.Any]):
    """A BentoML service (`bentoml.service(service_class=...)`) whose document says OpenAPI 3.1."""

    @property
    def openapi_spec(self):
        return generate_spec(self, openapi_version=OPENAPI_VERSION)
