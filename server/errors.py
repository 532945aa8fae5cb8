"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

`APIError` is what the serving code raises; `install_error_handlers` maps it, FastAPI's validation
errors (400, with `param` naming the field), unknown routes (404) and wrong methods (405) to that
body. Anything unexpected is middleware.InternalErrorMiddleware's (500, logged with its traceback).
"""
from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    """An HTTP error with OpenAI's body; `headers` are added to the response (Retry-After, ...)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# pydantic puts the union member it tried into `loc` ("str", "list[int]", "NamedToolChoice",
# "literal['none','auto']", "function-after[...]"): those are not field names.
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _param_from_loc(loc: tuple) -> str | None:
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _FIELD.fullmatch(part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
        else:
            break
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"malformed JSON in the request body{': ' + str(detail) if detail else ''}",
                           code="invalid_json")
    param = _param_from_loc(tuple(first.get("loc") or ()))
    if param is None and first.get("type") == "missing":
        return bad_request("the request body is empty: send a JSON object", code="invalid_json")
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return bad_request("the request body must be a JSON object", code="invalid_json")
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return bad_request(f"missing required field '{param}'", param=param, code="missing_required_parameter")
    where = f"'{param}'" if param else "the request body"
    return bad_request(f"invalid value for {where}: {msg}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            message = f"unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, headers=headers).response()


def _allowed_methods(request: Request) -> list[str]:
    """Every method a route serves at the request's path (Starlette's 405 names only the first
    route's, and GET /health and HEAD /health are two routes)."""
    return sorted({method for route in request.app.router.routes
                   if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE
                   for method in route.methods})
