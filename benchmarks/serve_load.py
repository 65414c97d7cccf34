"""Serving under load: many concurrent streaming clients against a
real `nanoseek serve` on 127.0.0.1.

A fixed number of chat requests (each generating exactly --max-tokens tokens: ignore_eos) is shared
by --clients concurrent streaming clients. Reported as JSON lines {"bench", "ours", "anchor",
"ratio", "unit", "config", ...}:
  throughput   generated tokens/s through HTTP; anchor: the same requests through Engine.generate
               in-process with max_batch_size = clients, so the ratio is what the server keeps of
               the engine's own speed
  ttft_p50/99  seconds from sending a request to its first token chunk
  cpu          CPU seconds per generated token, the server process's (all threads) vs the
               in-process engine's: unlike wall time, this does not depend on what else runs on
               the machine
  rss          the server's resident memory after the load; anchor: before it
Every request must succeed (status 200, usage and [DONE] present, exactly --max-tokens tokens): the
exit status is 1 otherwise.

    python benchmarks/serve_load.py [--clients 32] [--requests 128] [--max-tokens 32]
                                    [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' server process and tokenizer helpers

from nanoseek import ModelConfig, Transformer, save_model  # noqa: E402

from serve_helpers import ServerProcess, build_tokenizer  # noqa: E402  (after the path is set)

# The "cpu" preset's model shape with a small trained tokenizer; random
# weights (speed does not need skill).
MODEL = dict(
    hidden_size=192,
    intermediate_size=576,
    moe_intermediate_size=96,
    num_hidden_layers=5,
    num_attention_heads=6,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    kv_lora_rank=64,
    q_lora_rank=96,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=1024,
    num_nextn_predict_layers=0,
)
QUESTIONS = [
    "What is 12 + 35?",
    "Write a haiku about the sea.",
    "用一句话介绍你自己。",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
    "今天天气怎么样？",
    "Explain MoE in one line.",
    "Count to five.",
]


def make_checkpoint(path: Path) -> Path:
    tok = build_tokenizer(vocab_size=1024)
    torch.manual_seed(0)
    save_model(
        Transformer(ModelConfig(vocab_size=tok.vocab_size, **MODEL)).eval(), path, tokenizer=tok
    )
    return path


def request_body(i: int, max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": i,
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    usage = None
    done = False
    error = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"status {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and any(
                c["delta"].get("content") or c["delta"].get("reasoning_content")
                for c in chunk["choices"]
            ):
                first = time.perf_counter()
    if error or not done or usage is None:
        return {"error": error or "stream ended without usage and [DONE]"}
    if usage["completion_tokens"] != body["max_tokens"]:
        return {"error": f"{usage['completion_tokens']} tokens instead of {body['max_tokens']}"}
    return {"ttft": (first or time.perf_counter()) - start, "tokens": usage["completion_tokens"]}


async def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    todo = iter(range(requests))
    results: list[dict] = []

    async def client_loop(client):
        for i in todo:  # a shared iterator: each request goes to whichever client is free
            try:
                results.append(await one_request(client, url, request_body(i, max_tokens)))
            except httpx.HTTPError as e:
                results.append({"error": f"{type(e).__name__}: {e}"})

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offline_throughput(
    checkpoint: Path, requests: int, max_tokens: int, max_batch_size: int
) -> tuple[float, float]:
    """The same requests through Engine.generate in this process, max_batch_size at a time: the
    engine's speed.
    -> (tokens/s, CPU seconds per token)"""
    from nanoseek.checkpoint import load_checkpoint
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.serve.chat_format import EngineTokenizer, chat_prompt

    ckpt = load_checkpoint(checkpoint)
    engine = Engine(ckpt.model, EngineTokenizer(ckpt.tokenizer), max_batch_size=max_batch_size)
    prompts, params = [], []
    for i in range(requests):
        body = request_body(i, max_tokens)
        prompts.append(chat_prompt(ckpt.tokenizer, body["messages"], True)[0])
        params.append(
            SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=i)
        )
    engine.generate(prompts[:2], params[:2])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    outs = engine.generate(prompts, params)
    tokens = sum(len(o.token_ids) for o in outs)
    return tokens / (time.perf_counter() - start), (time.process_time() - cpu) / tokens


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, server and anchor alike (default 1: the clients need a core too)",
    )
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="default: a random-weight 'cpu'-preset model"
    )
    args = ap.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_checkpoint(Path(tmp) / "model")
        config = {
            "clients": args.clients,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "threads": threads,
            "checkpoint": str(args.checkpoint or "random cpu-preset model"),
        }
        with ServerProcess(
            checkpoint,
            "--threads",
            str(threads),
            "--max-concurrent-requests",
            str(max(64, args.clients)),
        ) as server:
            server.wait_ready()
            asyncio.run(load(server.url, 2, 2, args.max_tokens))  # warm-up
            rss_before, cpu_before = server.rss_bytes(), cpu_seconds(server.proc.pid)
            results, wall = asyncio.run(
                load(server.url, args.clients, args.requests, args.max_tokens)
            )
            rss_after, server_cpu = server.rss_bytes(), cpu_seconds(server.proc.pid) - cpu_before
        anchor, anchor_cpu = offline_throughput(
            checkpoint, args.requests, args.max_tokens, args.clients
        )

    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    ours = tokens / wall
    cpu = server_cpu / max(tokens, 1)
    common = {"config": config, "errors": len(errors), "completed": len(ok)}
    lines = [
        {
            "bench": "serve_load.throughput",
            "ours": ours,
            "anchor": anchor,
            "ratio": ours / anchor,
            "unit": "tokens/s",
            "anchor_is": "Engine.generate in-process, same requests",
            "wall_s": wall,
        },
        {
            "bench": "serve_load.ttft_p50",
            "ours": percentile(ttfts, 50) if ttfts else None,
            "anchor": None,
            "ratio": None,
            "unit": "s",
        },
        {
            "bench": "serve_load.ttft_p99",
            "ours": percentile(ttfts, 99) if ttfts else None,
            "anchor": None,
            "ratio": None,
            "unit": "s",
        },
        {
            "bench": "serve_load.cpu_per_token",
            "ours": cpu,
            "anchor": anchor_cpu,
            "ratio": cpu / anchor_cpu,
            "unit": "CPU s/token",
            "anchor_is": "Engine.generate in-process, same requests",
        },
        {
            "bench": "serve_load.rss",
            "ours": rss_after,
            "anchor": rss_before,
            "ratio": rss_after / rss_before,
            "unit": "bytes",
            "anchor_is": "server RSS before the load",
        },
    ]
    for line in lines:
        print(json.dumps({**line, **common}), flush=True)
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
