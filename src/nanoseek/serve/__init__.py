"""Serving: the OpenAI-compatible HTTP API with DeepSeek extras (app.py), its request and response shapes
(protocol.py), the engine thread (bridge.py), prompts and the reasoning split (chat_format.py), JSON mode and other
logits processors (logits.py), /metrics (metrics.py), the web chat (web/), and the CLI commands (cli.py).

FastAPI and uvicorn are imported only by app.py and cli.py, so the rest loads without them."""

from nanoseek.serve.config import ServerConfig

__all__ = ["ServerConfig"]
