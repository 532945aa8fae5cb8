"""The OpenAPI document as the server answers: FastAPI documents a 422 for every validation error,
which this server answers 400 (OpenAI's status); and it knows nothing of the middlewares, which
answer 413 to a POST body over --max-request-bytes and, with --api-key, 401 on every route but /health.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .middleware import OPEN_PATHS

_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
_BEARER = "bearerAuth"


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def install_openapi(app: FastAPI, api_key: bool) -> None:
    """`app.openapi()` (and /openapi.json) gives FastAPI's document, corrected once."""
    fastapi_document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _as_answered(fastapi_document(), api_key)
        return app.openapi_schema

    app.openapi = openapi


def _as_answered(document: dict[str, Any], api_key: bool) -> dict[str, Any]:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _error("Invalid request"))
            if method == "post":
                responses["413"] = _error("Request body larger than --max-request-bytes")
            if api_key and path not in OPEN_PATHS:
                responses["401"] = _error("Missing or incorrect API key")
                operation["security"] = [{_BEARER: []}]
    components = document.setdefault("components", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    if api_key:
        components["securitySchemes"] = {_BEARER: {"type": "http", "scheme": "bearer"}}
    return document
