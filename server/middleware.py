"""Pure ASGI middlewares (they leave streaming responses and client disconnects untouched):
API-key checking, HTTP request counting, the request body's size limit, reading POST bodies as
JSON whatever their Content-Type, and one logged 500 for an unexpected exception."""
from __future__ import annotations

import asyncio
import ctypes
import hmac
import logging

from fastapi.responses import JSONResponse

from .errors import APIError, error_body

log = logging.getLogger("dsserve")

OPEN_PATHS = frozenset({"/health"})
# Bodies from this size on are followed by handing freed memory back to the system.
LARGE_BODY_BYTES = 1 << 20
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)    # glibc's; absent elsewhere


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
    """Every POST route here takes JSON, so every POST body is read as JSON: `curl -d '{...}'` sends it
    as form encoding, other clients as text/plain or with no Content-Type at all. A body that is not
    JSON gets the malformed-JSON 400, which says what is wrong with it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Bounds the memory one request takes. It reads each request's body before the app does, at most
    `max_bytes` of it: a larger one is answered 413 and never held (a Content-Length above the limit
    is refused before a byte is read, a chunked body once its count passes the limit). The app then
    reads the body as if from the client. Once a large body is answered, what it took is handed back
    to the system."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _content_length(scope) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()     # the pieces, a second copy of the body
        await self.app(scope, _replay(body, receive), send)
        if size >= LARGE_BODY_BYTES and _malloc_trim is not None:
            # glibc keeps memory that other threads (the text pool's) freed in their arenas: after
            # tokenizing a long text that is hundreds of MB, resident for good. Trimming takes up to
            # ~0.1 s, so not on the event loop.
            await asyncio.to_thread(_malloc_trim, 0)

    async def _too_large(self, scope, receive, send) -> None:
        # The rest of the body is left unread on the connection: it cannot carry another request.
        error = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                              "(--max-request-bytes)", code="request_too_large", headers={"Connection": "close"})
        await error.response()(scope, receive, send)


def _content_length(scope) -> int:
    """The declared body length; 0 when there is none (a chunked body is counted as it comes)."""
    value = dict(scope["headers"]).get(b"content-length", b"0")
    return int(value) if value.isdigit() else 0


def _replay(body: bytes, receive):
    """A `receive` that gives the body read already, then what the client sends next (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


class InternalErrorMiddleware:
    """An exception no handler took becomes one log line with its traceback and a 500 in OpenAI's shape.
    Every 500 says `Connection: close`: after an internal fault the connection is not trusted, and a
    keep-alive client must learn that from the response rather than from a reset on its next request.
    Once a response has started, the exception goes on to uvicorn, which logs it and cuts the
    connection: the only way left to tell the client that the body is incomplete."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] == 500:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = APIError(500, f"internal server error: {type(exc).__name__}: {exc}").response()
            await response(scope, receive, sending)
