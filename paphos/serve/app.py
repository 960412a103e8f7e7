"""The FastAPI app: OpenAI routes, the KoboldAI routes (serve/kobold.py), /health, /version,
/metrics, API-key check, error handlers.
Invariant: the AsyncEngine's thread runs exactly while the app's lifespan does; with API keys set,
no /v1 route does any work for a request without a valid key."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

import paphos
from paphos.engine.async_engine import AsyncEngine
from paphos.serve.kobold import add_kobold_routes
from paphos.serve.metrics import CONTENT_TYPE, ServerMetrics
from paphos.serve.openai import chat, completions, models, tokenize
from paphos.serve.openai.errors import OpenAIError, install_error_handlers
from paphos.serve.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from paphos.serve.openai.serving import ServingContext, served_model_names
from paphos.serve.server_config import ServerConfig

_OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})


def build_app(engine: AsyncEngine, server_config: ServerConfig | None = None) -> FastAPI:
    """An app serving `engine`; the engine thread starts with the app and stops with it."""
    server_config = server_config or ServerConfig()
    stats = lambda: engine.stats  # noqa: E731 - latest snapshot published by the engine thread
    metrics = ServerMetrics(stats, served_model_names(engine.engine.model_config)[0])
    ctx = ServingContext.from_engine(engine, metrics, server_config)
    engine.grammar_compile_timeout_s = server_config.grammar_compile_timeout_s

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="paphos", version=paphos.__version__, lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    if server_config.api_keys:
        _install_api_key_check(app, server_config.api_keys)
    _add_routes(app, ctx)
    if server_config.kobold_api:
        add_kobold_routes(app, ctx)
    return app


def _install_api_key_check(app: FastAPI, keys: tuple[str, ...]) -> None:
    encoded = [key.encode() for key in keys]

    def valid(candidate: str | None) -> bool:
        if not candidate:
            return False
        # Compare against every key so timing does not reveal which one nearly matched.
        return any([hmac.compare_digest(candidate.encode(), key) for key in encoded])

    @app.middleware("http")
    async def check_api_key(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path in _OPEN_PATHS or request.method == "OPTIONS":
            return await call_next(request)
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if valid(bearer) or valid(request.headers.get("x-api-key")):
            return await call_next(request)
        error = OpenAIError(401, "invalid or missing API key", code="invalid_api_key")
        return error.response()


def _add_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not ctx.engine.is_running:
            return OpenAIError(503, "the engine is not running").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": paphos.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(models.list_models(ctx).model_dump())

    @app.post("/v1/completions", response_model=None)
    async def create_completion(body: CompletionRequest, request: Request) -> Any:
        return await completions.create_completion(body, request, ctx)

    @app.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
        return await chat.create_chat_completion(body, request, ctx)

    @app.post("/v1/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        return tokenize.tokenize(body, ctx)

    @app.post("/v1/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, Any]:
        return tokenize.detokenize(body, ctx)
