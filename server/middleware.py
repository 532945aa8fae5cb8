"""Pure ASGI middlewares (they leave streaming responses and client disconnects untouched):
API-key checking, HTTP request counting, and reading form-encoded bodies as JSON."""
from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from .errors import error_body

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer KEY` carries the key (every route but /health)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send 'Authorization: Bearer KEY'" if not header
                   else "incorrect API key provided")
        response = JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class MetricsMiddleware:
    """Counts requests by method, route (known routes only: unknown paths count as 'other') and status."""

    def __init__(self, app, counter, routes: frozenset[str]):
        self.app = app
        self.counter = counter
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"] if scope["path"] in self.routes else "other"
            self.counter.labels(scope["method"], path, str(status[0])).inc()


class JSONBodyMiddleware:
    """`curl -d '{...}'` without `-H Content-Type: application/json` sends form encoding; every POST route
    here takes JSON, so such a body is read as the JSON it is."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            content_type = dict(scope["headers"]).get(b"content-type", b"")
            if content_type.startswith(b"application/x-www-form-urlencoded"):
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)
