"""The HTTP app: routes, error handlers, the request counter, the web chat; serve/server.py and
serve/openai.py do the work.

    app = create_app(ServerConfig(...), load=lambda: load_checkpoint("runs/cpu/model"))

The app starts answering at once and loads the model on a thread: until it is ready /health and the
API say 503. Errors are OpenAI error objects (Anthropic's on /v1/messages).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanoseek.checkpoint import Checkpoint
from nanoseek.serve import anthropic_protocol, protocol
from nanoseek.serve.anthropic import AnthropicAPI
from nanoseek.serve.config import ServerConfig
from nanoseek.serve.errors import APIError
from nanoseek.serve.http import Guard
from nanoseek.serve.metrics import Metrics
from nanoseek.serve.openai import OpenAIAPI
from nanoseek.serve.server import Server
from nanoseek.serve.tokenize import TokenizerAPI

log = logging.getLogger("nanoseek.serve")
WEB = Path(__file__).parent / "web"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class _CountRequests:
    """ASGI middleware: requests_total by endpoint and status (unknown paths share one label)."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope["path"]
            self.metrics.count_request(path if path in self.endpoints else "other", status)


def create_app(
    config: ServerConfig,
    load: Callable[[], Checkpoint],
    engine_options: dict | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    server = Server(config, load, engine_options)
    api = OpenAIAPI(server)
    tokenizer_api = TokenizerAPI(api)
    anthropic_api = AnthropicAPI(api)

    def load_in_background():
        try:
            server.load()
        except BaseException as e:
            if on_load_error is not None:
                on_load_error(e)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load_in_background, name="nanoseek-load", daemon=True).start()
        yield
        server.close()

    app = FastAPI(
        title="nanoseek",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.openapi = lambda: _openapi(app)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        server.metrics.count_error(e.type)
        return JSONResponse(e.body_for(request.url.path), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect):  # mid-body: no one to answer
        return await api_error(
            request, APIError(499, "the client closed the connection", code="client_closed")
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = str(e.detail)
        if e.status_code in (404, 405):
            message = f"no route {request.method} {request.url.path}"
        server.metrics.count_error(kind)
        return JSONResponse(
            APIError(e.status_code, message, kind).body_for(request.url.path),
            status_code=e.status_code,
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        server.metrics.count_error("server_error")
        return JSONResponse(
            APIError(500, f"internal error: {type(e).__name__}", "server_error").body_for(
                request.url.path
            ),
            status_code=500,
        )

    @app.post(
        "/v1/chat/completions",
        openapi_extra=_body(protocol.ChatCompletionRequest),
        responses=_responses(protocol.ChatCompletion, stream=True),
    )
    async def chat_completions(request: Request):
        return await api.chat_completions(request)

    @app.post(
        "/v1/completions",
        openapi_extra=_body(protocol.CompletionRequest),
        responses=_responses(protocol.Completion, stream=True),
    )
    async def completions(request: Request):
        return await api.completions(request)

    @app.post(
        "/v1/messages",
        openapi_extra=_body(anthropic_protocol.MessagesRequest),
        responses={
            200: {
                "description": "an Anthropic message; with stream=true, Anthropic's named SSE "
                "events (serve/anthropic.py)",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        }
        | {
            code: {"description": f"{why} (an Anthropic error object)"}
            for code, why in ERRORS.items()
        },
    )
    async def messages(request: Request):
        return await anthropic_api.messages(request)

    @app.post(
        "/tokenize",
        openapi_extra=_body(protocol.TokenizeCompletionRequest, protocol.TokenizeChatRequest),
        responses=_responses(protocol.TokenizeResponse),
    )
    async def tokenize(request: Request):
        return await tokenizer_api.tokenize(request)

    @app.post(
        "/detokenize",
        openapi_extra=_body(protocol.DetokenizeRequest),
        responses=_responses(protocol.DetokenizeResponse),
    )
    async def detokenize(request: Request):
        return await tokenizer_api.detokenize(request)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        return tokenizer_api.tokenizer_info(request)

    @app.get("/v1/models", responses=_responses(protocol.ModelList))
    async def models(request: Request):
        return api.models(request)

    @app.get("/health")
    async def health():
        code, body = server.health
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics():
        gauges = {
            "requests_running": ("Requests holding a slot.", server.active),
            "requests_queued": ("Requests waiting for a slot.", server.queued),
            "sequences_admitted": (
                "Prompts x n of the requests running or queued.",
                server.sequences,
            ),
            "tokens_admitted": ("(Prompt + max_tokens) x n of the same.", server.tokens),
        }
        counters = {}
        if server.status == "ok":
            s = server.engine_stats()
            gauges |= {
                "engine_sequences_running": ("Sequences in the engine's batch.", s["running"]),
                "engine_sequences_waiting": (
                    "Sequences waiting in the engine's queue.",
                    s["waiting"],
                ),
                "queue_depth": (
                    "Requests and sequences waiting, server and engine.",
                    server.queued + s["waiting"],
                ),
                "kv_cache_free_blocks": ("Free blocks of the latent KV cache.", s["free_blocks"]),
                "kv_cache_total_blocks": ("Blocks of the latent KV cache.", s["total_blocks"]),
                "kv_cache_usage_ratio": (
                    "Share of the latent KV cache's blocks that sequences hold (cached prefixes "
                    "that none holds count as free).",
                    1 - s["free_blocks"] / s["total_blocks"],
                ),
                "kv_cache_cached_blocks": (
                    "Blocks that hold published prefixes and no sequence (reusable, evictable).",
                    s["cached_blocks"],
                ),
                "kv_cache_capacity_tokens": (
                    "Tokens the latent KV cache holds.",
                    s["capacity_tokens"],
                ),
                "prefix_cache_hit_rate": (
                    "Prompt tokens served from the prefix cache / all.",
                    s["prefix_cache_hit_rate"],
                ),
            }
            counters = {
                "engine_steps_total": ("Engine steps (forward passes).", s["steps"]),
                "engine_generated_tokens_total": (
                    "Tokens the engine generated, cancelled requests included.",
                    s["generated_tokens"],
                ),
                "engine_preemptions_total": (
                    "Sequences preempted for lack of cache blocks.",
                    s["preemptions"],
                ),
            }
            if s["speculative"]:
                counters |= {
                    "spec_decode_draft_tokens_total": (
                        "Tokens the MTP module drafted and the model checked.",
                        s["spec_drafted"],
                    ),
                    "spec_decode_accepted_tokens_total": (
                        "Drafted tokens the model accepted.",
                        s["spec_accepted"],
                    ),
                }
                if s["spec_acceptance_rate"] is not None:
                    gauges["spec_decode_acceptance_rate"] = (
                        "Accepted / drafted MTP tokens since the start.",
                        s["spec_acceptance_rate"],
                    )
        return Response(
            server.metrics.render(gauges, counters), media_type="text/plain; version=0.0.4"
        )

    @app.get("/")
    async def index():
        return FileResponse(
            WEB / "index.html",
            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
        )

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(Guard, config=config, on_error=server.metrics.count_error)
    app.add_middleware(
        _CountRequests,
        metrics=server.metrics,
        endpoints={
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/messages",
            "/v1/models",
            "/tokenize",
            "/detokenize",
            "/tokenizer_info",
            "/health",
            "/metrics",
            "/",
            "/openapi.json",
        },
    )
    return app


SCHEMAS = "#/components/schemas/{model}"
REQUEST_MODELS = (
    protocol.ChatCompletionRequest,
    protocol.CompletionRequest,
    protocol.TokenizeCompletionRequest,
    protocol.TokenizeChatRequest,
    protocol.DetokenizeRequest,
    anthropic_protocol.MessagesRequest,
)
ERRORS = {
    400: "invalid request",
    401: "no valid API key",
    404: "unknown model or route",
    408: "the body arrived too slowly",
    413: "body too large",
    415: "the body is not application/json",
    429: "queue full",
    503: "loading, engine failed or no slot in time",
    504: "past the request timeout",
}


def _body(*models: type) -> dict:
    """The OpenAPI requestBody of a route that parses one of `models` from its JSON body itself."""
    refs = [{"$ref": SCHEMAS.format(model=m.__name__)} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _responses(model: type, stream: bool = False) -> dict:
    ok = {"model": model, "description": "the response"}
    if stream:
        ok["description"] += "; with stream=true, server-sent events of its chunks"
        ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    errors = {
        code: {"model": protocol.ErrorResponse, "description": why} for code, why in ERRORS.items()
    }
    return {200: ok} | errors


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, with the request models the routes parse themselves."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title="nanoseek",
            version="0.1.0",
            routes=app.routes,
            description="An OpenAI-compatible API with DeepSeek extras.",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            model_schema = model.model_json_schema(ref_template=SCHEMAS)
            components |= model_schema.pop("$defs", {})
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema
