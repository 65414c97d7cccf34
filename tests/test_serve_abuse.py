"""The server under abuse: no request outlives its client, one client cannot take the engine,
admission counts sequences and tokens, tokenizing stays off the event loop, /metrics never waits
on the engine. Real HTTP on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from nanoseek.checkpoint import load_checkpoint
from nanoseek.serve.app import create_app
from nanoseek.serve.config import ServerConfig

from serve_helpers import SCRIPT, InProcessServer, ServerProcess, metric, shared_checkpoint

HELLO, _, _ = SCRIPT[0]


@pytest.fixture(scope="module")
def checkpoint():
    return shared_checkpoint()


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(checkpoint, "--max-tokens", "450") as s:
        yield s.wait_ready()


def engine_busy(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return (metric(text, "nanoseek_engine_sequences_running")
            + metric(text, "nanoseek_engine_sequences_waiting"))


def wait_idle(url: str, within: float) -> float:
    """Seconds until the engine has no sequence left; fails after `within`."""
    start = time.perf_counter()
    while engine_busy(url):
        assert time.perf_counter() - start < within, "the engine kept generating"
        time.sleep(0.05)
    return time.perf_counter() - start


def test_a_non_streaming_multi_prompt_request_is_cancelled_when_its_client_leaves(server):
    body = {"prompt": ["la la"] * 8, "n": 8, "max_tokens": 400, "ignore_eos": True}
    for _ in range(3):  # a lost cancellation is a race: give it several chances to show
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
        wait_idle(server.url, within=2.0)
        assert metric(httpx.get(server.url + "/metrics").text, "nanoseek_requests_running") == 0
