"""The HTTP app: routes, error handlers, the request counter, the web chat; serve/server.py and
serve/openai.py do the work.

    app = create_app(ServerConfig(...), load=lambda: load_checkpoint("runs/cpu/model"))

The app starts answering at once and loads the model on a thread: until it is ready /health and the
API say 503. Errors are OpenAI error objects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.checkpoint import Checkpoint
from nanoseek.serve.config import ServerConfig
from nanoseek.serve.errors import APIError
from nanoseek.serve.metrics import Metrics
from nanoseek.serve.openai import OpenAIAPI
from nanoseek.serve.server import Server

log = logging.getLogger("nanoseek.serve")
WEB = Path(__file__).parent / "web"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


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


def create_app(config: ServerConfig, load: Callable[[], Checkpoint],
               engine_options: dict | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    server = Server(config, load, engine_options)
    api = OpenAIAPI(server)

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

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        server.metrics.count_error(e.type)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = str(e.detail)
        if e.status_code in (404, 405):
            message = f"no route {request.method} {request.url.path}"
        server.metrics.count_error(kind)
        return JSONResponse(APIError(e.status_code, message, kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        server.metrics.count_error("server_error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}",
                                     "server_error").body(),
                            status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.chat_completions(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.completions(request)

    @app.get("/v1/models")
    async def models(request: Request):
        return api.models(request)

    @app.get("/health")
    async def health():
        code, body = server.health
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics():
        gauges = {"requests_running": ("Requests holding a slot.", server.active),
                  "requests_queued": ("Requests waiting for a slot.", server.queued),
                  "sequences_admitted": ("Prompts x n of the requests running or queued.",
                                         server.sequences),
                  "tokens_admitted": ("(Prompt + max_tokens) x n of the same.", server.tokens)}
        counters = {}
        if server.status == "ok":
            s = server.engine_stats()
            gauges |= {
                "engine_sequences_running": ("Sequences in the engine's batch.", s["running"]),
                "engine_sequences_waiting": ("Sequences waiting in the engine's queue.",
                                             s["waiting"]),
                "queue_depth": ("Requests and sequences waiting, server and engine.",
                                server.queued + s["waiting"]),
                "kv_cache_free_blocks": ("Free blocks of the latent KV cache.", s["free_blocks"]),
                "kv_cache_total_blocks": ("Blocks of the latent KV cache.", s["total_blocks"]),
                "prefix_cache_hit_rate": ("Prompt tokens served from the prefix cache / all.",
                                          s["prefix_cache_hit_rate"])}
            counters = {
                "engine_steps_total": ("Engine steps (forward passes).", s["steps"]),
                "engine_generated_tokens_total": ("Tokens the engine generated, cancelled "
                                                  "requests included.", s["generated_tokens"]),
                "engine_preemptions_total": ("Sequences preempted for lack of cache blocks.",
                                             s["preemptions"])}
        return Response(server.metrics.render(gauges, counters),
                        media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": CSP,
                                                         "X-Content-Type-Options": "nosniff"})

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(_CountRequests, metrics=server.metrics,
                       endpoints={"/v1/chat/completions", "/v1/completions", "/v1/models",
                                  "/health", "/metrics", "/"})
    return app
