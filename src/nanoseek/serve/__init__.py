"""Serving: the OpenAI-compatible HTTP API with DeepSeek extras. Routes and middleware (app.py); the
connection deadlines and the Host and Content-Type rules (http.py); the server's lifecycle,
admission and engine runs (server.py); the OpenAI translation of requests and responses
(openai.py); one request's state (job.py); errors (errors.py); request and response shapes
(protocol.py); the engine thread (bridge.py); prompts and the reasoning split (chat_format.py); JSON
mode and other logits processors (logits.py); /metrics (metrics.py); the web chat (web/).
`nanoseek serve` is in cli/serve.py.

FastAPI is imported only by app.py, server.py and openai.py, so the rest loads without it."""

from nanoseek.serve.config import ServerConfig

__all__ = ["ServerConfig"]
