"""A real `nanoseek serve` subprocess on 127.0.0.1, driven by the official openai client (happy
paths) and by raw httpx (SSE framing and every error path). The model is tiny and trained in the
test to say SCRIPT, so answers and their reasoning are known exactly; other checks compare against
the tokenizer and between requests."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from nanoseek.checkpoint import load_checkpoint
from nanoseek.serve.app import create_app
from nanoseek.serve.chat_format import completion_prompt
from nanoseek.serve.config import ServerConfig
from nanoseek.tokenizer import load_tokenizer

from serve_helpers import (
    SCRIPT,
    InProcessServer,
    ServerProcess,
    metric,
    nanoseek,
    shared_checkpoint,
)

KEY = "test-key-123"
NAME = "nanoseek-test"
HELLO, HELLO_THOUGHT, HELLO_ANSWER = SCRIPT[0]
NIHAO, NIHAO_THOUGHT, NIHAO_ANSWER = SCRIPT[1]


@pytest.fixture(scope="module")
def checkpoint():
    return shared_checkpoint()


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(
        checkpoint, "--api-key", KEY, "--model-name", NAME, "--max-tokens", "450"
    ) as s:
        yield s.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(checkpoint):
    return load_tokenizer(checkpoint)


def user(text):
    return [{"role": "user", "content": text}]


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kw)


def sse(server, body):
    """Raw SSE lines of a streaming chat request."""
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


# -------------------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize(
    "message,thought,answer",
    [(HELLO, HELLO_THOUGHT, HELLO_ANSWER), (NIHAO, NIHAO_THOUGHT, NIHAO_ANSWER)],
)
def test_chat_answers_with_reasoning_content_and_usage_that_agrees_with_the_tokenizer(
    client, tok, message, thought, answer
):
    r = client.chat.completions.create(
        model=NAME, messages=user(message), temperature=0, logprobs=True
    )
    choice = r.choices[0]
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == NAME
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.reasoning_content == thought and choice.message.content == answer
    prompt = tok.apply_chat_template(user(message), add_generation_prompt=True, sanitize=True)
    u = r.usage
    tokens = choice.logprobs.content
    assert u.prompt_tokens == len(prompt) and u.completion_tokens == len(tokens)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    names = [t.token for t in tokens]
    assert names[-1] == "<｜end▁of▁sentence｜>"
    assert u.completion_tokens_details.reasoning_tokens == names.index("</think>") + 1
    text = b"".join(
        bytes(t.bytes) for t in tokens if t.token not in ("</think>", names[-1])
    ).decode()
    assert text == f"{thought}\n\n{answer}"


def test_stream_framing_and_equality_with_the_non_stream_answer(server, client):
    body = {
        "model": NAME,
        "messages": user(HELLO),
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines = sse(server, body)
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(
        c["object"] == "chat.completion.chunk" for c in chunks
    )
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""} and all(
        "role" not in d for d in deltas[1:]
    )
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finishes.count("stop") == 1 and finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    kinds = [
        "r" if d.get("reasoning_content") else "c"
        for d in deltas
        if d.get("reasoning_content") or d.get("content")
    ]
    # reasoning first, then content
    assert "".join(kinds) == "r" * kinds.count("r") + "c" * kinds.count("c")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0

    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    whole = client.chat.completions.create(model=NAME, messages=user(HELLO), temperature=0)
    assert (reasoning, content) == (
        whole.choices[0].message.reasoning_content,
        whole.choices[0].message.content,
    )
    assert chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens


def test_stream_through_the_openai_client(client):
    stream = client.chat.completions.create(
        model=NAME,
        messages=user(NIHAO),
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning = content = ""
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert (reasoning, content) == (
        NIHAO_THOUGHT,
        NIHAO_ANSWER,
    ) and usage.prompt_cache_hit_tokens >= 0


def test_n_completions(client):
    r = client.chat.completions.create(
        model=NAME,
        messages=user("Tell me something"),
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=12,
        logprobs=True,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    stream = client.chat.completions.create(
        model=NAME,
        messages=user("Tell me something"),
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=12,
        stream=True,
    )
    finished, text = {}, {0: "", 1: "", 2: ""}
    for chunk in stream:
        for c in chunk.choices:
            text[c.index] += (getattr(c.delta, "reasoning_content", None) or "") + (
                c.delta.content or ""
            )
            if c.finish_reason:
                assert c.index not in finished
                finished[c.index] = c.finish_reason
    assert sorted(finished) == [0, 1, 2]
    whole = [(c.message.reasoning_content or "") + c.message.content for c in r.choices]
    assert [text[i] for i in range(3)] == whole  # same seed, same completions, streamed or not


def test_stop_strings_end_the_answer_and_are_not_returned(client):
    r = client.chat.completions.create(
        model=NAME, messages=user(HELLO), temperature=0, stop=["How"]
    )
    assert r.choices[0].message.content == "Hello! " and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.reasoning_content == HELLO_THOUGHT


def test_max_tokens_cuts_with_finish_reason_length(client):
    r = client.chat.completions.create(
        model=NAME, messages=user(HELLO), temperature=0, max_completion_tokens=3
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(
        model=NAME, messages=user(HELLO), temperature=0, logprobs=True, top_logprobs=3
    )
    for t in r.choices[0].logprobs.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(tops[0])  # greedy


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        r = client.chat.completions.create(
            model=NAME,
            messages=user("Write about the sea"),
            temperature=1.5,
            seed=seed,
            max_tokens=16,
        )
        return (r.choices[0].message.reasoning_content or "") + "|" + r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(5)}) > 1


def test_thinking_switch(client, tok):
    expected = {
        True: tok.apply_chat_template(user(HELLO), add_generation_prompt=True, thinking=True),
        False: tok.apply_chat_template(user(HELLO), add_generation_prompt=True, thinking=False),
    }
    for extra, thinking in [
        ({"thinking": {"type": "disabled"}}, False),
        ({"thinking": {"type": "enabled"}}, True),
        ({"chat_template_kwargs": {"thinking": False}}, False),
        ({}, True),
    ]:
        r = client.chat.completions.create(
            model=NAME, messages=user(HELLO), temperature=0, max_tokens=5, extra_body=extra
        )
        assert r.usage.prompt_tokens == len(expected[thinking]), extra
    # Without the prefilled "<think>", this model opens the thought itself: it is still split off.
    r = client.chat.completions.create(
        model=NAME,
        messages=user(HELLO),
        temperature=0,
        extra_body={"thinking": {"type": "disabled"}},
    )
    assert r.choices[0].message.content == HELLO_ANSWER and r.choices[0].message.reasoning_content


def test_chat_prefix_completion(client):
    r = client.chat.completions.create(
        model=NAME,
        temperature=0,
        messages=[
            *user(HELLO),
            {
                "role": "assistant",
                "reasoning_content": HELLO_THOUGHT,
                "content": "Hello! How",
                "prefix": True,
            },
        ],
    )
    assert r.choices[0].message.content == HELLO_ANSWER.removeprefix("Hello! How")
    assert r.choices[0].message.reasoning_content is None  # the thought was given, not generated
    # A prefix inside the thought: the rest of the thought is reasoning, then the answer follows.
    r = client.chat.completions.create(
        model=NAME,
        temperature=0,
        messages=[
            *user(HELLO),
            {"role": "assistant", "reasoning_content": "The user", "content": "", "prefix": True},
        ],
    )
    assert r.choices[0].message.reasoning_content == HELLO_THOUGHT.removeprefix("The user")
    assert r.choices[0].message.content == HELLO_ANSWER


@pytest.mark.parametrize("thinking", ["enabled", "disabled"])
def test_json_mode_returns_an_object(client, thinking):
    for seed in range(3):
        r = client.chat.completions.create(
            model=NAME,
            messages=user("Reply in JSON"),
            temperature=1.0,
            seed=seed,
            max_tokens=40,
            response_format={"type": "json_object"},
            extra_body={"thinking": {"type": thinking}},
        )
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_prefix_cache_hits_are_reported(client):
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 6}, *user(HELLO)]
    first = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=2
    )
    second = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=2
    )
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 32
    hit = second.usage.prompt_cache_hit_tokens
    assert hit > first.usage.prompt_cache_hit_tokens and hit % 16 == 0  # whole cache blocks
    assert second.usage.prompt_tokens_details.cached_tokens == hit
    assert hit + second.usage.prompt_cache_miss_tokens == second.usage.prompt_tokens


def test_completions_batches_echo_and_logprobs(client, tok):
    r = client.completions.create(
        model=NAME,
        prompt=["The quick", "你好"],
        n=2,
        max_tokens=6,
        temperature=0,
        echo=True,
        logprobs=2,
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.object == "text_completion"
    assert r.choices[0].text.startswith("The quick") and r.choices[2].text.startswith("你好")
    assert r.choices[0].text == r.choices[1].text  # greedy: both completions agree
    assert r.usage.prompt_tokens == len(completion_prompt(tok, "The quick", None)) + len(
        completion_prompt(tok, "你好", None)
    )
    # echo: the prompt's tokens come first (the first without a logprob), then the 6 generated
    lp = r.choices[0].logprobs
    n = len(completion_prompt(tok, "The quick", None))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len("The quick")
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    ids = client.completions.create(
        model=NAME, prompt=tok.encode("The quick", add_bos=True), max_tokens=6, temperature=0
    )
    assert ids.choices[0].text == r.choices[0].text.removeprefix("The quick")


def test_completions_stream(client):
    whole = client.completions.create(model=NAME, prompt="la la", max_tokens=8, temperature=0)
    parts = list(
        client.completions.create(
            model=NAME, prompt="la la", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in parts if c.choices) == whole.choices[0].text
    assert [
        c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason
    ] == ["length"]


def test_fill_in_the_middle(client, tok):
    r = client.completions.create(
        model=NAME, prompt="def add(a, b):\n    ", suffix="\n", max_tokens=5, temperature=0
    )
    assert r.usage.prompt_tokens == len(completion_prompt(tok, "def add(a, b):\n    ", "\n"))
    assert r.choices[0].finish_reason in ("stop", "length")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed


def test_metrics_are_prometheus_text(server, client):
    client.chat.completions.create(model=NAME, messages=user(HELLO), temperature=0, max_tokens=4)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "nanoseek_time_to_first_token_seconds_count",
        "nanoseek_time_per_output_token_seconds_count",
        "nanoseek_prompt_tokens_total",
        "nanoseek_generation_tokens_total",
        "nanoseek_prompt_cache_hit_tokens_total",
        "nanoseek_queue_depth",
    ):
        metric(text, name)
    assert (
        metric(text, 'nanoseek_requests_total{endpoint="/v1/chat/completions",status="200"}') >= 1
    )
    assert metric(text, "nanoseek_generation_tokens_total") >= 4


def test_terminal_chat_with_the_server_keeps_the_conversation(server):
    r = nanoseek(
        "chat",
        "--url",
        server.url,
        "--api-key",
        KEY,
        "--temperature",
        "0",
        "--max-tokens",
        "60",
        stdin=f"{HELLO}\n/thinking off\n{NIHAO}\n",
    )  # ends with EOF, like Ctrl-D
    assert r.returncode == 0, r.stderr
    assert f"<think>\n{HELLO_THOUGHT}\n</think>\n{HELLO_ANSWER}" in r.stdout
    assert f"{NIHAO_ANSWER}" in r.stdout  # the second turn, with the first in its history
    assert "(thinking off)" in r.stdout and r.stdout.count("assistant> ") == 2
    bad = nanoseek("chat", "--url", server.url, "--api-key", "wrong", stdin="hi\n")
    assert bad.returncode == 2 and "401" in bad.stderr


# -------------------------------------------------------------------------------------- error paths


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_api_key_is_required_on_v1_only(server):
    body = {"messages": user(HELLO), "max_tokens": 2}
    assert (
        error_of(post(server, "/v1/chat/completions", body, key=None), 401)["type"]
        == "authentication_error"
    )
    assert (
        error_of(post(server, "/v1/chat/completions", body, key="wrong"), 401)["code"]
        == "invalid_api_key"
    )
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"X-Api-Key": KEY}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": user("x"), "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user"}], "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({}, "messages"),
        ({"messages": user("x"), "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": user("x"), "max_tokens": 100000}, "max_tokens"),
        ({"messages": user("x"), "logit_bias": {"999999": 5}}, "logit_bias"),
        # str.isdigit says yes, int() no
        ({"messages": user("x"), "logit_bias": {"²": 5}}, "logit_bias"),
        # more digits than int() takes
        ({"messages": user("x"), "logit_bias": {"1" * 4301: 5}}, "logit_bias"),
        # int() reads an Arabic-Indic 1 as 1
        ({"messages": user("x"), "logit_bias": {"١": 5}}, "logit_bias"),
        (
            {"messages": user("x"), "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "prefix": True}, *user("y")]},
            "messages.0.prefix",
        ),
    ],
)
def test_invalid_requests_get_400_naming_the_field(server, body, param):
    err = error_of(post(server, "/v1/chat/completions", body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_prompt_token_ids_outside_the_vocabulary_get_400(server):
    for prompt in ([-1], [[5, -3]], [10**30], [-(10**30)]):
        err = error_of(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2}), 400)
        assert err["param"] == "prompt"


def test_non_finite_numbers_get_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for value in ("Infinity", "-Infinity", "NaN"):
        raw = (
            '{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": ' + value + "}"
        )
        r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers)
        assert error_of(r, 400)["param"] == "repetition_penalty"


def test_malformed_bodies_get_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw in (b"{not json", b"[]", b"", '{"messages": "\xff"}'.encode("latin-1")):
        r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers)
        error_of(r, 400)
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(
            base_url=server.url + "/v1", api_key=KEY, max_retries=0
        ).chat.completions.create(model=NAME, messages=user("x"), temperature=5)


def test_unknown_model_and_route_get_404(server):
    err = error_of(
        post(server, "/v1/chat/completions", {"model": "gpt-9", "messages": user("x")}), 404
    )
    assert err["param"] == "model" and "gpt-9" in err["message"]
    assert error_of(post(server, "/v1/nothing", {}), 404)["type"] == "not_found_error"
    error_of(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_prompt_over_the_context_gets_400(server):
    err = error_of(post(server, "/v1/chat/completions", {"messages": user("la " * 600)}), 400)
    assert err["code"] == "context_length_exceeded"
    err = error_of(post(server, "/v1/completions", {"prompt": [5] * 515}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"


def test_body_over_the_limit_gets_413(server):
    r = post(server, "/v1/chat/completions", {"messages": user("x" * (2 << 20))})
    assert error_of(r, 413)["code"] == "body_too_large"


def test_a_client_that_leaves_mid_stream_cancels_its_generation(server):
    before = metric(
        httpx.get(server.url + "/metrics").text, "nanoseek_engine_generated_tokens_total"
    )
    body = {
        "model": NAME,
        "messages": user("Sing"),
        "stream": True,
        "max_tokens": 400,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    while True:  # the engine stops working on it once the disconnect is seen
        text = httpx.get(server.url + "/metrics").text
        if metric(text, "nanoseek_engine_sequences_running") == 0:
            break
        time.sleep(0.05)
    generated = metric(text, "nanoseek_engine_generated_tokens_total") - before
    assert 1 <= generated < 100  # a finished request would have made 400


def test_bad_requests_do_not_disturb_a_running_stream(server, client):
    results = {}

    def stream():
        s = client.chat.completions.create(
            model=NAME, messages=user(NIHAO), temperature=0, stream=True
        )
        results["text"] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    t = threading.Thread(target=stream)
    t.start()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw in (
        b"\x00\x01\x02",
        b'{"messages": [{"role": "user", "content": {"a": 1}}]}',
        b"{" * 5000,
    ):
        assert (
            httpx.post(
                server.url + "/v1/chat/completions", content=raw, headers=headers
            ).status_code
            == 400
        )
    assert post(server, "/v1/completions", {"prompt": "x", "n": 1000}).status_code == 400
    t.join(120)
    assert results["text"] == NIHAO_ANSWER
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# The tests below run the app in this process, to hold its engine
# still or break it; still real HTTP.


def test_a_full_queue_gets_429_with_retry_after(checkpoint):
    config = ServerConfig(max_concurrent_requests=1, max_queue=1)
    with InProcessServer(create_app(config, lambda: load_checkpoint(checkpoint))) as s:
        while httpx.get(s.url + "/health").status_code != 200:
            time.sleep(0.05)
        results = {}

        def ask(name):
            results[name] = httpx.post(
                s.url + "/v1/chat/completions",
                timeout=120,
                json={"messages": user(HELLO), "temperature": 0, "max_tokens": 3},
            )

        with s.state.engine._lock:  # the engine cannot step: the first request keeps its slot
            threads = [threading.Thread(target=ask, args=(name,)) for name in ("first", "second")]
            threads[0].start()
            while s.state.active < 1:
                time.sleep(0.01)
            threads[1].start()
            while s.state.queued < 1:
                time.sleep(0.01)
            r = httpx.post(
                s.url + "/v1/chat/completions", json={"messages": user(HELLO), "max_tokens": 3}
            )
            err = error_of(r, 429)
            assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        for t in threads:  # the engine moves again: both finish
            t.join(120)
        assert [results[n].json()["choices"][0]["finish_reason"] for n in ("first", "second")] == [
            "length"
        ] * 2
        text = httpx.get(s.url + "/metrics").text
        assert (
            metric(text, 'nanoseek_requests_total{endpoint="/v1/chat/completions",status="429"}')
            == 1
        )
        assert metric(text, 'nanoseek_errors_total{type="rate_limit_error"}') == 1


def test_not_ready_is_503_and_a_dead_engine_too(checkpoint):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(60)
        return load_checkpoint(checkpoint)

    with InProcessServer(create_app(ServerConfig(), slow_load)) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": user(HELLO)})
        assert error_of(r, 503)["type"] == "unavailable_error" and r.headers["retry-after"] == "5"
        loaded.set()
        while httpx.get(s.url + "/health").status_code != 200:
            time.sleep(0.05)
        ok = httpx.post(
            s.url + "/v1/chat/completions", json={"messages": user(HELLO), "max_tokens": 2}
        )
        assert ok.status_code == 200

        def broken_step():
            raise RuntimeError("simulated device failure")

        s.state.engine.step = broken_step
        r = httpx.post(
            s.url + "/v1/chat/completions", json={"messages": user(HELLO), "max_tokens": 2}
        )
        assert (
            error_of(r, 503)["code"] == "engine_dead"
            and "simulated" in r.json()["error"]["message"]
        )
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert error_of(httpx.post(s.url + "/v1/completions", json={"prompt": "x"}), 503)
        stream = httpx.post(
            s.url + "/v1/chat/completions", json={"messages": user(HELLO), "stream": True}
        )
        assert stream.status_code == 503
        assert httpx.get(s.url + "/metrics").status_code == 200  # still answering


def test_loading_failure_is_reported(tmp_path):
    def broken_load():
        raise FileNotFoundError("no weights here")

    failures = []
    with InProcessServer(
        create_app(ServerConfig(), broken_load, on_load_error=failures.append)
    ) as s:
        while not failures:
            time.sleep(0.02)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "no weights here" in r.json()["error"]


def test_a_request_out_of_time_gets_504_and_is_cancelled(checkpoint):
    with InProcessServer(
        create_app(ServerConfig(request_timeout=1.0), lambda: load_checkpoint(checkpoint))
    ) as s:
        while httpx.get(s.url + "/health").status_code != 200:
            time.sleep(0.05)
        body = {"messages": user("Sing"), "max_tokens": 400, "ignore_eos": True}
        with s.state.engine._lock:  # the engine cannot step: nothing can finish in time
            r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
            assert error_of(r, 504)["code"] == "request_timeout"
            lines = [
                line
                for line in httpx.post(
                    s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
                ).text.splitlines()
                if line
            ]
            assert (
                json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
                and lines[-1] == "data: [DONE]"
            )
        while s.state.engine.has_unfinished():
            time.sleep(0.05)
        assert s.state.engine.stats()["generated_tokens"] < 10  # cancelled, not run to 400 tokens


async def asgi_post(app, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """One request handed straight to the ASGI app with the headers as given
    (uvicorn's HTTP parsers refuse a malformed Content-Length before the app sees
    it; other ASGI servers may pass one on)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )


def test_a_malformed_content_length_is_no_500(checkpoint):
    with InProcessServer(create_app(ServerConfig(), lambda: load_checkpoint(checkpoint))) as s:
        while httpx.get(s.url + "/health").status_code != 200:
            time.sleep(0.05)
        body = json.dumps({"messages": []}).encode()  # a 400 once read: nothing reaches the engine
        for declared, status in (("²", 400), ("1" * 4301, 413), (f"{1 << 21}", 413), (" 5", 400)):
            code, answer = asyncio.run(
                asgi_post(
                    s.app,
                    "/v1/chat/completions",
                    body,
                    {"content-type": "application/json", "content-length": declared},
                )
            )
            assert code == status, (declared[:8], answer)
