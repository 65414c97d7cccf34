"""The server under abuse: no request outlives its client, one client cannot take the engine,
admission counts sequences and tokens, tokenizing stays off the event loop, /metrics never waits
on the engine. Real HTTP on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing

import httpx
import pytest

from nanoseek.checkpoint import load_checkpoint
from nanoseek.engine import SamplingParams
from nanoseek.engine.sequence import CompletionOutput, RequestOutput, StepEvent
from nanoseek.serve.app import create_app
from nanoseek.serve.config import ServerConfig
from nanoseek.serve.job import Job
from nanoseek.serve.server import Server

from serve_helpers import SCRIPT, InProcessServer, ServerProcess, metric, shared_checkpoint

HELLO, _, _ = SCRIPT[0]


@pytest.fixture(scope="module")
def checkpoint():
    return shared_checkpoint()


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(
        checkpoint, "--max-tokens", "450", "--max-sequences-per-request", "1000"
    ) as s:
        yield s.wait_ready()


def engine_busy(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return metric(text, "nanoseek_engine_sequences_running") + metric(
        text, "nanoseek_engine_sequences_waiting"
    )


def wait_idle(url: str, within: float) -> float:
    """Seconds until the engine has no sequence left; fails after `within`."""
    start = time.perf_counter()
    while engine_busy(url):
        assert time.perf_counter() - start < within, "the engine kept generating"
        time.sleep(0.05)
    return time.perf_counter() - start


class RecordingBridge:
    """Stands in for the engine thread: keeps the queues it is given, records cancellations."""

    def __init__(self):
        self.queues: list[asyncio.Queue] = []
        self.cancelled: list[str] = []

    def submit(self, ids, params, request_id, queue, group=None, images=None):
        self.queues.append(queue)

    def cancel(self, request_id):
        self.cancelled.append(request_id)


def test_a_cancellation_that_lands_as_an_event_arrives_is_not_lost():
    """The race behind requests that outlived their clients, made deterministic: the job's task is
    cancelled in the same loop iteration as its next event arrives (asyncio.wait_for on Python 3.11
    returned the event and dropped the cancellation; the job then ran on)."""
    server = Server(ServerConfig(), load=None)
    server.bridge = RecordingBridge()
    now = time.perf_counter()
    job = Job("job", [[1, 2]], SamplingParams(max_tokens=5), lambda: None, now, now + 60)
    output = RequestOutput("job-0", [1, 2], [CompletionOutput(0)])
    event = StepEvent("job-0", 0, [3], "x", None, False, None, output)

    async def main() -> bool:
        async def consume():
            async with aclosing(server.events(job)) as events:
                async for _ in events:
                    pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the task now waits for its first event
        server.bridge.queues[0].put_nowait(event)
        task.cancel()
        await asyncio.wait([task], timeout=2)
        return task.cancelled()

    assert asyncio.run(main())
    assert server.bridge.cancelled == ["job-0"]  # and its engine request was cancelled


def test_a_non_streaming_multi_prompt_request_is_cancelled_when_its_client_leaves(server):
    body = {"prompt": ["la la"] * 8, "n": 8, "max_tokens": 400, "ignore_eos": True}
    for _ in range(5):  # a lost cancellation is a race: give it several chances to show
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
        wait_idle(server.url, within=2.0)
        assert metric(httpx.get(server.url + "/metrics").text, "nanoseek_requests_running") == 0


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def in_process(checkpoint, **config) -> InProcessServer:
    s = InProcessServer(create_app(ServerConfig(**config), lambda: load_checkpoint(checkpoint)))
    while httpx.get(s.url + "/health").status_code != 200:
        time.sleep(0.05)
    return s


def test_prompts_times_n_over_the_limit_get_429_and_lm_eval_batches_fit(server):
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": ["x"] * 100, "n": 11}, timeout=30
    )
    err = error_of(r, 429)
    assert err["code"] == "too_many_sequences" and "1100 sequences" in err["message"]
    assert "at most 1000 per request" in err["message"]  # the flag's value
    assert r.headers["x-should-retry"] == "false"  # retrying the same request cannot help
    r = httpx.post(
        server.url + "/v1/completions",
        timeout=120,
        json={"prompt": [f"{i} la" for i in range(300)], "max_tokens": 1},
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 300


def test_sequences_and_tokens_of_all_admitted_requests_are_limited(checkpoint):
    with in_process(
        checkpoint, max_sequences_per_request=16, max_queued_sequences=24, max_queued_tokens=500
    ) as s:
        results = {}

        def ask():
            results["first"] = httpx.post(
                s.url + "/v1/completions",
                timeout=120,
                json={"prompt": ["la"] * 4, "n": 4, "max_tokens": 2},
            )

        with s.state.engine._lock:  # the engine cannot step: the first request stays admitted
            t = threading.Thread(target=ask)
            t.start()
            while s.state.sequences < 16:
                time.sleep(0.01)
            r = httpx.post(s.url + "/v1/completions", json={"prompt": ["la"] * 3, "n": 3})
            err = error_of(r, 429)
            assert err["code"] == "queue_full" and r.headers["retry-after"] == "1"
            assert "16 sequences" in err["message"]
            r = httpx.post(s.url + "/v1/completions", json={"prompt": ["la"], "max_tokens": 450})
            assert error_of(r, 429)["code"] == "queue_full"  # 8 sequences fit, their tokens do not
        t.join(120)
        assert results["first"].status_code == 200
        assert s.state.sequences == 0 and s.state.tokens == 0
        r = httpx.post(s.url + "/v1/completions", json={"prompt": ["la"] * 3, "n": 3}, timeout=60)
        assert r.status_code == 200


def test_a_small_request_is_answered_while_a_huge_one_runs(server):
    """One client's 32 prompts x n=8 x 400 tokens (first come, first served: 1,600 steps of the
    whole batch) do not keep another client's one-token request waiting for them."""
    huge = {"prompt": ["la la"] * 32, "n": 8, "max_tokens": 400, "ignore_eos": True}

    def run_huge():  # its client gives up after 10 s (the request is then cancelled)
        try:
            httpx.post(server.url + "/v1/completions", json=huge, timeout=10)
        except httpx.ReadTimeout:
            pass

    t = threading.Thread(target=run_huge)
    t.start()
    while engine_busy(server.url) < 8:
        time.sleep(0.02)
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": "la", "max_tokens": 1}, timeout=60
    )
    assert r.status_code == 200 and t.is_alive()  # answered, and the huge one still runs
    assert engine_busy(server.url) > 0
    t.join(120)
    wait_idle(server.url, within=2.0)


def test_a_prompt_too_long_in_bytes_is_refused_before_it_is_tokenized(checkpoint):
    with in_process(checkpoint) as s:
        threads = []
        tok = s.state.tok
        template = tok.apply_chat_template

        def spy(*args, **kw):
            threads.append(threading.current_thread())
            return template(*args, **kw)

        tok.apply_chat_template = spy
        r = httpx.post(
            s.url + "/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "a" * 900_000}]},
        )
        err = error_of(r, 400)
        assert err["code"] == "context_length_exceeded" and "900000 bytes" in err["message"]
        assert threads == []  # refused by its size alone
        r = httpx.post(s.url + "/v1/completions", json={"prompt": ["la", "b" * 900_000]})
        assert "900000 bytes" in error_of(r, 400)["message"]
        r = httpx.post(
            s.url + "/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": HELLO}], "max_tokens": 1},
        )
        assert r.status_code == 200
        assert threads and s.thread not in threads  # tokenized off the event loop's thread


def test_metrics_do_not_wait_for_the_engine(checkpoint):
    with in_process(checkpoint) as s:
        with s.state.engine._lock:  # a long step holds the engine's lock
            r = httpx.get(s.url + "/metrics", timeout=3)
        assert r.status_code == 200
        assert metric(r.text, "nanoseek_kv_cache_total_blocks") > 0
