"""Serving under abuse: streaming clients, a third of them leaving early, next to one huge request.

Against a real `nanoseek serve` on 127.0.0.1 (a random-weight model of the `cpu` preset's shape,
as in serve_load.py), two phases with the same --clients streaming clients (--requests-per-client
chat requests each, --max-tokens tokens, every third client closing each of its streams after the
first token):
  idle   the clients alone: the anchor;
  abuse  the clients while one client's --huge-prompts x n=--huge-n completion request runs
         (non-streaming; the server is started with limits that admit it); that client leaves once
         the others are done.
Reported as JSON lines {"bench", "ours", "anchor", "ratio", "unit", "config", ...}:
  small_ttft_p99  the small requests' p99 time to first token under abuse; anchor: the idle phase's
  idle_after_s    seconds from the huge request's client leaving until the engine has no sequence
  rss             the server's resident memory after the abuse (engine idle); anchor: before it
  errors          failed small requests, both phases (a deliberate early close is no failure), and
                  the huge request's failures other than its own client leaving
Targets: 0 errors; p99 <= 2 s or <= 5x idle; idle within 2 s; RSS after <= before + 200 MB. Exit
status 1 if a target is missed.

    python benchmarks/serve_abuse.py [--clients 32] [--requests-per-client 2]
                                     [--huge-prompts 1500] [--huge-n 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' server process helper
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import QUESTIONS, make_checkpoint, percentile  # noqa: E402

from serve_helpers import ServerProcess, metric  # noqa: E402  (after the path is set)

MB = 1 << 20


def small_body(i: int, max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": i,
    }


async def small_request(client: httpx.AsyncClient, url: str, body: dict, leave: bool) -> dict:
    """One streaming chat request -> {"ttft"} or {"error"}; with
    `leave`, close after the first token."""
    start = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"status {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if first is None and any(
                c["delta"].get("content") or c["delta"].get("reasoning_content")
                for c in chunk["choices"]
            ):
                first = time.perf_counter()
                if leave:
                    return {"ttft": first - start, "left": True}
    if first is None:
        return {"error": "no token came"}
    return {"ttft": first - start}


async def clients(url: str, n: int, per_client: int, max_tokens: int) -> list[dict]:
    results: list[dict] = []

    async def client_loop(c: int, client: httpx.AsyncClient):
        for k in range(per_client):
            try:
                results.append(
                    await small_request(
                        client, url, small_body(c * per_client + k, max_tokens), leave=c % 3 == 0
                    )
                )
            except httpx.HTTPError as e:
                results.append({"error": f"{type(e).__name__}: {e}"})

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(n)))
    return results


async def engine_sequences(client: httpx.AsyncClient, url: str) -> float:
    text = (await client.get(url + "/metrics")).text
    return metric(text, "nanoseek_engine_sequences_running") + metric(
        text, "nanoseek_engine_sequences_waiting"
    )


async def abuse(url: str, args) -> tuple[list[dict], list[str], float]:
    """-> (small results, huge request errors, seconds from its client leaving to an idle engine)"""
    huge_errors: list[str] = []
    body = {
        "prompt": [f"{i} la la" for i in range(args.huge_prompts)],
        "n": args.huge_n,
        "max_tokens": args.huge_max_tokens,
        "ignore_eos": True,
    }

    async def huge():
        async with httpx.AsyncClient(timeout=3600) as client:
            r = await client.post(url + "/v1/completions", json=body)
            huge_errors.append(
                f"the huge request ended before its client left: {r.status_code} {r.text[:200]}"
            )

    async with httpx.AsyncClient(timeout=30) as probe:
        task = asyncio.ensure_future(huge())
        while await engine_sequences(probe, url) < args.huge_n and not task.done():
            await asyncio.sleep(0.05)
        results = await clients(url, args.clients, args.requests_per_client, args.max_tokens)
        task.cancel()  # the huge request's client leaves: its connection closes
        left = time.perf_counter()
        try:
            await task
        except asyncio.CancelledError:
            pass
        while await engine_sequences(probe, url) > 0:
            if time.perf_counter() - left > 120:
                huge_errors.append(
                    "the engine still ran sequences 120 s after the last client left"
                )
                break
            await asyncio.sleep(0.02)
        return results, huge_errors, time.perf_counter() - left


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--huge-prompts", type=int, default=1500)
    ap.add_argument("--huge-n", type=int, default=64)
    ap.add_argument("--huge-max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="default: a random-weight 'cpu'-preset model"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sequences = args.huge_prompts * args.huge_n
    config = {k: v for k, v in vars(args).items() if k != "checkpoint"}
    config["checkpoint"] = str(args.checkpoint or "random cpu-preset model")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_checkpoint(Path(tmp) / "model")
        limits = [
            "--max-sequences-per-request",
            str(sequences),
            "--max-queued-sequences",
            str(2 * sequences),
            "--max-queued-tokens",
            str(1 << 40),
        ]
        with ServerProcess(checkpoint, "--threads", str(args.threads), *limits) as server:
            server.wait_ready()
            asyncio.run(clients(server.url, 2, 1, args.max_tokens))  # warm-up
            idle = asyncio.run(
                clients(server.url, args.clients, args.requests_per_client, args.max_tokens)
            )
            rss_before = server.rss_bytes()
            small, huge_errors, idle_after = asyncio.run(abuse(server.url, args))
            rss_after = server.rss_bytes()

    errors = [r["error"] for r in idle + small if "error" in r] + huge_errors
    idle_p99 = percentile([r["ttft"] for r in idle if "ttft" in r], 99)
    ttfts = [r["ttft"] for r in small if "ttft" in r]
    p99 = percentile(ttfts, 99) if ttfts else float("inf")
    common = {
        "config": config,
        "errors": len(errors),
        "small_requests": len(small),
        "left_early": sum(1 for r in small if r.get("left")),
    }
    lines = [
        {
            "bench": "serve_abuse.small_ttft_p99",
            "ours": p99,
            "anchor": idle_p99,
            "ratio": p99 / idle_p99,
            "unit": "s",
            "anchor_is": "the same clients on an idle server",
            "target": "<= 2 s or <= 5x anchor",
        },
        {
            "bench": "serve_abuse.idle_after_s",
            "ours": idle_after,
            "anchor": None,
            "ratio": None,
            "unit": "s",
            "target": "<= 2 s",
        },
        {
            "bench": "serve_abuse.rss",
            "ours": rss_after,
            "anchor": rss_before,
            "ratio": rss_after / rss_before,
            "unit": "bytes",
            "anchor_is": "server RSS before the abuse",
            "target": "<= anchor + 200 MB",
        },
        {
            "bench": "serve_abuse.errors",
            "ours": len(errors),
            "anchor": 0,
            "ratio": None,
            "unit": "errors",
            "target": "0",
        },
    ]
    for line in lines:
        print(json.dumps({**line, **common}), flush=True)
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    missed = (
        errors
        or not (p99 <= 2 or p99 <= 5 * idle_p99)
        or idle_after > 2
        or rss_after > rss_before + 200 * MB
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
