"""`nanoseek serve CKPT`: the HTTP server as a command; add_commands(subparsers) registers it."""

from __future__ import annotations

import logging
import os
import socket
import sys

from nanoseek.cli.common import (
    add_decode_arguments,
    add_weight_arguments,
    check_checkpoint,
    decode_options,
)


def add_commands(subparsers) -> None:
    d = _defaults()
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint: OpenAI-compatible API, web chat at /, /health, /metrics",
        description="Serve a checkpoint over HTTP: POST /v1/chat/completions and /v1/completions "
        "(OpenAI shapes, streaming, DeepSeek reasoning_content), GET /v1/models, "
        "/health, /metrics, and a web chat at /. Listens on 127.0.0.1 unless --host "
        "says otherwise; makes no outside calls.",
    )
    p.add_argument(
        "checkpoint", help="a checkpoint directory (config.json, weights, tokenizer.json)"
    )
    p.add_argument(
        "--host", default=d.host, help=f"address to listen on (default: {d.host}; 0.0.0.0 for all)"
    )
    p.add_argument(
        "--port", type=int, default=d.port, help=f"port (default: {d.port}; 0 picks a free one)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("NANOSEEK_API_KEY"),
        help="require this key on /v1/* (default: $NANOSEEK_API_KEY, else no key)",
    )
    p.add_argument(
        "--model-name",
        default=d.model_name,
        help=f"the model's name in the API (default: {d.model_name})",
    )
    p.add_argument(
        "--no-thinking", action="store_true", help="answer without a thought unless a request asks"
    )
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    lim.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        help="the most tokens one completion may ask",
    )
    lim.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    lim.add_argument(
        "--max-queue", type=int, default=d.max_queue, help="requests waiting beyond that get 429"
    )
    lim.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=d.max_sequences_per_request,
        help="prompts x n one request may ask; more get 429 "
        f"(default: {d.max_sequences_per_request})",
    )
    lim.add_argument(
        "--max-queued-sequences",
        type=int,
        default=d.max_queued_sequences,
        help="prompts x n of all requests running or queued; beyond, 429 "
        f"(default: {d.max_queued_sequences})",
    )
    lim.add_argument(
        "--max-queued-tokens",
        type=int,
        default=d.max_queued_tokens,
        help="(prompt + max_tokens) x n of all of them; beyond, 429 "
        f"(default: {d.max_queued_tokens})",
    )
    lim.add_argument(
        "--max-images-per-request",
        type=int,
        default=d.max_images_per_request,
        help="image content parts in one chat request (vision checkpoints); beyond, 400 "
        f"(default: {d.max_images_per_request})",
    )
    lim.add_argument(
        "--request-timeout", type=float, default=d.request_timeout, help="seconds per request"
    )
    eng = p.add_argument_group("engine")
    eng.add_argument(
        "--max-batch-size", type=int, default=64, help="sequences decoded together (default: 64)"
    )
    eng.add_argument(
        "--max-num-batched-tokens", type=int, default=1024, help="tokens per step (default: 1024)"
    )
    eng.add_argument(
        "--cache-memory", type=float, default=None, help="GiB for the latent KV cache (default: 1)"
    )
    add_weight_arguments(eng)
    add_decode_arguments(eng)
    eng.add_argument(
        "--speculative", action="store_true", help="MTP speculative decoding (needs an MTP module)"
    )
    eng.add_argument("--no-prefix-cache", action="store_true")
    eng.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    web = p.add_argument_group("HTTP")
    web.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help="seconds for a request's headers to arrive, then the connection closes "
        f"(default: {d.header_timeout:g})",
    )
    web.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout,
        help="seconds for a request's body to arrive after its headers, then 408 "
        f"(default: {d.body_timeout:g})",
    )
    web.add_argument(
        "--allowed-hosts",
        type=_host_list,
        default=None,
        metavar="HOST[,HOST...]",
        help="Host header names served ('*': any; default: the localhost names and "
        "the address when listening on loopback, else any)",
    )
    web.add_argument(
        "--remote-image-hosts",
        type=_host_list,
        default=(),
        metavar="HOST[,HOST...]",
        help="hosts whose http(s) image URLs chat requests may name; the server fetches them "
        "('*': any host, internal ones included; default: none, images come as data: URLs)",
    )
    web.add_argument(
        "--remote-image-timeout",
        type=float,
        default=d.remote_image_timeout,
        metavar="SECONDS",
        help="seconds to connect to a remote image, and per read "
        f"(default: {d.remote_image_timeout:g})",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(func=cmd_serve)


def _host_list(text: str) -> tuple[str, ...]:
    return tuple(h.strip() for h in text.split(",") if h.strip())


def _defaults():
    from nanoseek.serve.config import ServerConfig

    return ServerConfig()


def cmd_serve(args) -> int:
    import torch
    import uvicorn

    from nanoseek.checkpoint import load_checkpoint
    from nanoseek.serve.app import create_app
    from nanoseek.serve.config import ServerConfig
    from nanoseek.serve.http import uvicorn_config

    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_name=args.model_name,
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_queue=args.max_queue,
        max_sequences_per_request=args.max_sequences_per_request,
        max_queued_sequences=args.max_queued_sequences,
        max_queued_tokens=args.max_queued_tokens,
        max_images_per_request=args.max_images_per_request,
        request_timeout=args.request_timeout,
        thinking=not args.no_thinking,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        allowed_hosts=args.allowed_hosts,
        remote_image_hosts=args.remote_image_hosts,
        remote_image_timeout=args.remote_image_timeout,
    )
    ckpt = check_checkpoint(args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine_options = dict(
        max_batch_size=args.max_batch_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        speculative=args.speculative,
        enable_prefix_cache=not args.no_prefix_cache,
        **decode_options(args),
    )
    if args.cache_memory is not None:
        engine_options["cache_memory"] = int(args.cache_memory * (1 << 30))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    family = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((config.host, config.port), family=family)
    port = sock.getsockname()[1]
    failed: list[BaseException] = []

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    app = create_app(
        config,
        lambda: load_checkpoint(ckpt, args.dtype, args.int8, vision=True),
        engine_options,
        on_load_error,
    )
    server = uvicorn.Server(
        uvicorn_config(
            app,
            config,
            log_level=args.log_level,
            access_log=args.access_log,
            timeout_graceful_shutdown=5,
        )
    )
    host = f"[{config.host}]" if ":" in config.host else config.host
    where = f"http://{host}:{port}"
    print(f"nanoseek serve: {where} (model {config.model_name!r} from {ckpt}; loading)", flush=True)
    server.run(sockets=[sock])
    if failed:
        print(f"nanoseek serve: error: loading {ckpt} failed: {failed[0]}", file=sys.stderr)
        return 1
    return 0
