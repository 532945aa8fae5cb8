"""The FastAPI app: `create_app(engine, args)` wires the routes to the serving code.

OpenAI: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}].
SGLang: POST /generate, GET|POST /flush_cache, GET /get_model_info, GET /health_generate.
Also GET|HEAD /health, GET /metrics, POST /v1/tokenize and /v1/detokenize (and without /v1), and
FastAPI's /openapi.json and /docs. Every route but /health needs the key when --api-key is set.
Each route documents the errors its own code answers; openapi.py adds the middlewares'.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .args import ServerArgs
from dsserve.core.engine import Engine
from dsserve.core.errors import EngineUnavailable, RequestError
from dsserve.core.sampling_params import SamplingParams
from .chat import ChatServing
from .completions import CompletionServing
from .errors import APIError, install_error_handlers
from .metrics_export import CONTENT_TYPE, PrometheusExporter
from .middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    InternalErrorMiddleware,
    JSONBodyMiddleware,
    MetricsMiddleware,
)
from .native import NativeServing
from .openapi import install_openapi
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    MessageResponse,
    ModelCard,
    ModelInfo,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .reasoning import get_reasoning_parser
from .serving import Serving
from .tool_calls import get_tool_call_parser

log = logging.getLogger("dsserve")

HEALTH_GENERATE_TIMEOUT_S = 60.0
# The `responses` each route documents besides its 200 and FastAPI's validation errors (openapi.py
# adds the middlewares' answers).
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No such model"}}
_EMPTY = {"content": {}}      # a status without a body
_HEALTH = {200: {**_EMPTY, "description": "The engine serves"}, 503: {**_EMPTY, "description": "The engine stopped"}}
_GENERATION_ERRORS = {500: {"model": ErrorResponse, "description": "The engine failed"},
                      503: {"model": ErrorResponse, "description": "Busy (Retry-After), or the engine stopped"}}
# One server-sent event (before OpenAPI 3.2, the `schema` of an event stream describes each event).
_STREAMED = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk; '[DONE]' last"}}}}}


def _generating(model) -> dict:
    """`responses` of a generating route: `model` as JSON, or a stream of chunks with "stream": true."""
    return {200: {"model": model, "content": _STREAMED}, **_GENERATION_ERRORS}


def create_app(engine: Engine, args: ServerArgs | None = None) -> FastAPI:
    args = args or ServerArgs.from_engine_args(engine.args)
    serving = Serving(engine, args)
    reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None
    tools = get_tool_call_parser(args.tool_call_parser) if args.tool_call_parser else None
    chat = ChatServing(serving, reasoning, tools)
    completions = CompletionServing(serving)
    native = NativeServing(serving, chat.prompts)
    exporter = PrometheusExporter(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        exporter.close()
        serving.close()

    from dsserve import __version__

    app = FastAPI(title="dsserve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for DeepSeek models")
    app.state.serving = serving
    app.state.exporter = exporter
    install_error_handlers(app)

    @app.post("/v1/chat/completions", responses=_generating(ChatCompletionResponse))
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await chat.create(req, raw)

    @app.post("/v1/completions", responses=_generating(CompletionResponse))
    async def completions_(req: CompletionRequest, raw: Request):
        return await completions.create(req, raw)

    def model_card() -> ModelCard:
        return ModelCard(id=serving.model_name, root=args.model_path or serving.model_name,
                         max_model_len=serving.max_context)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_NOT_FOUND)
    async def model(model_id: str):
        if model_id not in serving.model_names:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health", response_class=Response, responses=_HEALTH)
    @app.head("/health", response_class=Response, responses=_HEALTH)
    async def health():
        """200 while the engine serves; 503 once it has stopped (shut down, or its model worker died)."""
        return Response(status_code=200 if engine.alive else 503)

    @app.get("/health_generate", response_class=Response,
             responses={200: {**_EMPTY, "description": "A token was generated"},
                        503: {"model": ErrorResponse, "description": "The engine did not answer"}})
    async def health_generate():
        """Generates one token; 200 when the engine answers, 503 otherwise."""
        bos = engine.tokenizer.bos_token_id if engine.tokenizer is not None else None
        try:
            handle = engine.add_request(input_ids=[bos if bos is not None else 0],
                                        sampling_params=SamplingParams(max_new_tokens=1, temperature=0))
        except (RequestError, EngineUnavailable) as e:
            raise APIError(503, f"the engine refused a request: {e}") from None

        async def one_token():
            async for out in handle:
                if out.finished:
                    return out

        try:
            out = await asyncio.wait_for(one_token(), HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            handle.abort()
            raise APIError(503, f"no token generated within {HEALTH_GENERATE_TIMEOUT_S:.0f} s") from None
        if out.finish_reason == "error":
            raise APIError(503, f"generation failed: {out.error}")
        return Response(status_code=200)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics():
        return Response(exporter.render(), media_type=CONTENT_TYPE)

    @app.post("/generate", responses=_generating(GenerateResponse | list[GenerateResponse]))
    async def generate(req: GenerateRequest, raw: Request):
        return await native.generate(req, raw)

    @app.post("/v1/tokenize", response_model=TokenizeResponse)
    @app.post("/tokenize", response_model=TokenizeResponse, include_in_schema=False)
    async def tokenize(req: TokenizeRequest):
        return await native.tokenize(req)

    @app.post("/v1/detokenize", response_model=DetokenizeResponse)
    @app.post("/detokenize", response_model=DetokenizeResponse, include_in_schema=False)
    async def detokenize(req: DetokenizeRequest):
        return await native.detokenize(req)

    @app.post("/flush_cache", response_model=MessageResponse)
    @app.get("/flush_cache", response_model=MessageResponse)
    async def flush_cache():
        """Empties the prefix cache once the running requests are done."""
        await asyncio.get_running_loop().run_in_executor(None, engine.flush_cache)
        return MessageResponse(message="the prefix cache was flushed")

    @app.get("/get_model_info", response_model=ModelInfo)
    async def get_model_info():
        return ModelInfo(model_path=engine.info.model_path, served_model_name=serving.model_name,
                         tokenizer_path=args.tokenizer_path or engine.info.model_path, is_generation=True,
                         max_context_length=serving.max_context)

    install_openapi(app, api_key=bool(args.api_key))
    routes = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    app.add_middleware(JSONBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=args.max_request_bytes)
    if args.api_key:   # outside the body limit: no body is read for a client without the key
        app.add_middleware(APIKeyMiddleware, api_key=args.api_key)
    app.add_middleware(MetricsMiddleware, counter=exporter.http, routes=routes)
    app.add_middleware(InternalErrorMiddleware)
    return app
