"""POST /v1/messages through a real `nanoseek serve` subprocess and the official anthropic client:
a tiny model trained here (on prompts the server's own code builds) to greet, to think before
greeting, to call a tool and to answer from its result; plain and streamed messages (the SDK's
stream helper and the raw events), thinking blocks and the thought's budget, stop sequences,
max_tokens, a tool_use -> tool_result round trip, forced tool choices, the API key in x-api-key,
and bad requests (an Anthropic error object, 400, naming the field; the server stays up)."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from nanoseek import save_model
from nanoseek.checkpoint import load_checkpoint
from nanoseek.serve import protocol
from nanoseek.serve.app import create_app
from nanoseek.serve.chat_format import chat_prompt
from nanoseek.serve.config import ServerConfig
from nanoseek.serve.tools import generation_prefix

import serve_fuzz
from serve_helpers import (
    InProcessServer,
    ServerProcess,
    build_tokenizer,
    memorised_tensors,
    train_to_margin,
)

TOOLS = [  # Anthropic's shape
    {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
    {"name": "get_time", "description": "The time now", "input_schema": {"type": "object"}},
]
HELLO = "Hello"
HELLO_ANSWER = "Hello! How can I help?"
HELLO_THOUGHT = "The user greets me."
WEATHER_Q = "Weather in Paris?"
ARGS = {"city": "Paris"}
RESULT = "sunny, 21 C"
ANSWER = "It is sunny in Paris."
KEY = "sk-test-anthropic"
GREEDY = {"temperature": 0}  # the SDK has no temperature argument any more: sent as an extra


def openai_tools() -> list[dict]:
    """TOOLS as the chat path gets them (serve/anthropic.py's translation)."""
    out = []
    for t in TOOLS:
        function = {"name": t["name"], "parameters": t["input_schema"]}
        function["description"] = t["description"]
        tool = {"type": "function", "function": function}
        out.append(protocol.Tool.model_validate(tool).as_dict())
    return out


def call(name: str, arguments: dict) -> dict:
    c = {"id": "toolu_x", "type": "function", "function": {"name": name}}
    c["function"]["arguments"] = json.dumps(arguments)
    return {"role": "assistant", "content": None, "tool_calls": [c]}


def build_checkpoint(path):
    """A tiny model that: greets back on HELLO (thinking off), thinks HELLO_THOUGHT then greets
    (thinking on); with TOOLS, calls get_weather for WEATHER_Q, answers from the tool's result,
    and continues the prompts that tool_choice any (get_time) and tool get_weather prefill."""
    tok = build_tokenizer()
    tools = openai_tools()
    hello = [{"role": "user", "content": HELLO}]
    weather = [{"role": "user", "content": WEATHER_Q}]
    after_tool = [
        *weather,
        call("get_weather", ARGS),
        {"role": "tool", "tool_call_id": "toolu_x", "content": RESULT},
    ]
    greeting = {"role": "assistant", "content": HELLO_ANSWER}
    examples = [  # (prompt, thinking, tools, tool_choice, reply)
        (hello, False, None, "none", greeting),
        (hello, True, None, "none", {**greeting, "reasoning_content": HELLO_THOUGHT}),
        (weather, False, tools, "auto", call("get_weather", ARGS)),
        (after_tool, False, tools, "auto", {"role": "assistant", "content": ANSWER}),
        (hello, False, tools, "required", call("get_time", {})),
        (hello, False, tools, "get_weather", call("get_weather", ARGS)),
    ]
    rows = []
    for prompt, thinking, tool_list, choice, reply in examples:
        context, _ = chat_prompt(tok, prompt, thinking, tool_list)
        if tool_list:
            context += tok.encode(generation_prefix("raw", choice), allow_special=True)
        ids = tok.apply_chat_template(
            [*prompt, reply], tools=tool_list, thinking=thinking, sanitize=True
        )
        assert ids[: len(context)] == context
        rows.append((ids, len(context) - 1, True))
    inputs, targets = memorised_tensors(rows, tok.eos_id)
    model = train_to_margin(tok, inputs, targets, steps=150)
    save_model(model.eval(), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("anthropic") / "model")


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(checkpoint, "--max-tokens", "200", "--api-key", KEY) as s:
        yield s.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    # the SDK sends the key as x-api-key
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def create(client, messages, **kw):
    kw = {"model": "nanoseek", "max_tokens": 60, "messages": messages, "extra_body": GREEDY, **kw}
    return client.messages.create(**kw)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_plain_message(client):
    m = create(client, user(HELLO))
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [(b.type, b.text) for b in m.content] == [("text", HELLO_ANSWER)]
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.output_tokens > 0 and m.usage.input_tokens > 0
    # a string or text blocks, in the user message and the system prompt, are the same prompt
    blocks = [{"role": "user", "content": [{"type": "text", "text": HELLO}]}]
    again = create(client, blocks, metadata={"user_id": "u1"})
    assert again.content[0].text == HELLO_ANSWER
    assert again.usage.input_tokens + (again.usage.cache_read_input_tokens or 0) == (
        m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    )


def test_system_prompt_and_prefill(client):
    # a system string and the same text as a block are the same prompt
    counts = []
    for system in ("Be brief.", [{"type": "text", "text": "Be brief."}]):
        m = create(client, user(HELLO), system=system, max_tokens=1)
        counts.append(m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0))
    plain = create(client, user(HELLO), max_tokens=1).usage
    assert counts[0] == counts[1] > plain.input_tokens + (plain.cache_read_input_tokens or 0)
    # a last assistant message is continued (DeepSeek's prefix completion): the answer's rest
    head = HELLO_ANSWER[: HELLO_ANSWER.index(" help")]
    m = create(client, [*user(HELLO), {"role": "assistant", "content": head}])
    assert [(b.type, b.text) for b in m.content] == [("text", HELLO_ANSWER[len(head) :])]
    assert m.stop_reason == "end_turn"


def test_stop_sequence_and_max_tokens(client):
    m = create(client, user(HELLO), stop_sequences=["zzz", "help"])
    assert m.content[0].text == HELLO_ANSWER[: HELLO_ANSWER.index("help")]
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "help")
    m = create(client, user(HELLO), max_tokens=2)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2
    assert HELLO_ANSWER.startswith(m.content[0].text)


def test_streaming_with_the_sdk_helper(client):
    kw = {"model": "nanoseek", "max_tokens": 60, "extra_body": GREEDY, "messages": user(HELLO)}
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == HELLO_ANSWER
    assert [(b.type, b.text) for b in final.content] == [("text", HELLO_ANSWER)]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    plain = create(client, user(HELLO))
    assert final.usage.output_tokens == plain.usage.output_tokens


def raw_events(server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a streamed request, read off the wire."""
    body = {"model": "nanoseek", "max_tokens": 60, "temperature": 0, "stream": True, **body}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    out = []
    with httpx.stream("POST", server.url + "/v1/messages", json=body, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.read().decode().split("\n\n"):
            if not chunk.strip():
                continue
            name, data = chunk.split("\n")
            assert name.startswith("event: ") and data.startswith("data: ")
            payload = json.loads(data.removeprefix("data: "))
            assert payload["type"] == name.removeprefix("event: ")
            out.append((payload["type"], payload))
    return out


def check_event_order(events: list[tuple[str, dict]]) -> list[dict]:
    """Anthropic's order: message_start, blocks (start, deltas, stop; indexes 0, 1, ...),
    message_delta, message_stop. -> the blocks as a client assembles them."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    blocks = []
    open_index = None
    for name, e in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and e["index"] == len(blocks)
            open_index = e["index"]
            blocks.append(dict(e["content_block"]))
        elif name == "content_block_delta":
            assert e["index"] == open_index
            d = e["delta"]
            b = blocks[open_index]
            key = {"text_delta": "text", "thinking_delta": "thinking"}.get(d["type"])
            if key:
                b[key] += d[key]
            else:
                assert d["type"] == "input_json_delta"
                b["json"] = b.get("json", "") + d["partial_json"]
        elif name == "content_block_stop":
            assert e["index"] == open_index
            open_index = None
    assert open_index is None
    return blocks


def test_raw_stream_events(server):
    events = raw_events(server, {"messages": user(HELLO)})
    blocks = check_event_order(events)
    assert blocks == [{"type": "text", "text": HELLO_ANSWER}]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_blocks(client, server, stream):
    thinking = {"type": "enabled", "budget_tokens": 40}
    if not stream:
        m = create(client, user(HELLO), thinking=thinking)
        blocks = [
            (b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content
        ]
        assert blocks == [("thinking", HELLO_THOUGHT), ("text", HELLO_ANSWER)]
        assert m.stop_reason == "end_turn"
        return
    events = raw_events(server, {"messages": user(HELLO), "thinking": thinking})
    blocks = check_event_order(events)
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert blocks[0]["thinking"] == HELLO_THOUGHT and blocks[1]["text"] == HELLO_ANSWER
    kw = {"model": "nanoseek", "max_tokens": 60, "extra_body": GREEDY, "messages": user(HELLO)}
    with client.messages.stream(thinking=thinking, **kw) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == HELLO_THOUGHT


def test_adaptive_thinking_is_thinking_without_a_cap(client):
    m = create(client, user(HELLO), thinking={"type": "adaptive"})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert (m.content[0].thinking, m.content[1].text) == (HELLO_THOUGHT, HELLO_ANSWER)
    # and "disabled" is what no thinking field means
    m = create(client, user(HELLO), thinking={"type": "disabled"})
    assert [(b.type, b.text) for b in m.content] == [("text", HELLO_ANSWER)]


def test_output_config_format_is_a_json_schema(client):
    schema = {
        "type": "object",
        "properties": {"mood": {"enum": ["good", "bad"]}},
        "required": ["mood"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "schema": schema}}
    m = create(client, user(HELLO), output_config=fmt, max_tokens=100)
    assert m.stop_reason == "end_turn"
    assert json.loads(m.content[0].text) in ({"mood": "good"}, {"mood": "bad"})


def test_thinking_budget_caps_the_thought(client):
    m = create(client, user(HELLO), thinking={"type": "enabled", "budget_tokens": 2})
    thought = m.content[0]
    assert thought.type == "thinking"
    # the thought's first two tokens (as trained), then </think> was forced
    assert thought.thinking and HELLO_THOUGHT.startswith(thought.thinking)
    assert len(thought.thinking) < len(HELLO_THOUGHT)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_round_trip(client, stream):
    messages = user(WEATHER_Q)
    kw = {"model": "nanoseek", "max_tokens": 60, "extra_body": GREEDY, "tools": TOOLS}
    if stream:
        with client.messages.stream(messages=messages, **kw) as s:
            m = s.get_final_message()
    else:
        m = client.messages.create(messages=messages, **kw)
    assert m.stop_reason == "tool_use"
    [use] = m.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == ARGS
    assert use.id.startswith("toolu_")
    # the client runs the tool and sends its result back, with the assistant's content as it came
    messages = [
        *messages,
        {"role": "assistant", "content": m.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": RESULT}],
        },
    ]
    if stream:
        with client.messages.stream(messages=messages, **kw) as s:
            answer = s.get_final_message()
    else:
        answer = client.messages.create(messages=messages, **kw)
    assert [(b.type, b.text) for b in answer.content] == [("text", ANSWER)]
    assert answer.stop_reason == "end_turn"
    # tool_result content as text blocks is the same result
    messages[-1]["content"][0]["content"] = [{"type": "text", "text": RESULT}]
    assert client.messages.create(messages=messages, **kw).content[0].text == ANSWER


def test_raw_tool_use_events(server):
    events = raw_events(server, {"messages": user(WEATHER_Q), "tools": TOOLS})
    [block] = check_event_order(events)
    assert block["type"] == "tool_use" and block["input"] == {} and block["name"] == "get_weather"
    assert json.loads(block["json"]) == ARGS
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_forced_tool_choices(client):
    kw = {"tools": TOOLS}
    m = create(client, user(HELLO), tool_choice={"type": "any"}, **kw)
    assert [(b.type, b.name, b.input) for b in m.content] == [("tool_use", "get_time", {})]
    assert m.stop_reason == "tool_use"
    m = create(client, user(HELLO), tool_choice={"type": "tool", "name": "get_weather"}, **kw)
    assert [(b.type, b.name, b.input) for b in m.content] == [("tool_use", "get_weather", ARGS)]
    # "none": the tools stay declared, but no call can be made
    m = create(client, user(WEATHER_Q), tool_choice={"type": "none"}, max_tokens=20, **kw)
    assert all(b.type != "tool_use" for b in m.content)
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert not any("tool▁" in b.text for b in m.content if b.type == "text")


def test_api_key(server):
    body = {"model": "nanoseek", "max_tokens": 5, "messages": user(HELLO)}
    url = server.url + "/v1/messages"
    for headers in ({}, {"x-api-key": "wrong"}):
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "authentication_error"
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert httpx.post(url, json=body, headers=headers).status_code == 200
    # the OpenAI routes keep OpenAI's error object
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "type" not in r.json()


TOOL_TURN = [
    {"role": "user", "content": WEATHER_Q},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": ARGS}],
    },
]
BAD = [  # (fields of the body, text the error message names)
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "system", "content": "Hi"}]}, "messages.0.role"),
    ({"messages": [*TOOL_TURN, {"role": "user", "content": "and?"}]}, "messages.2.content"),
    (
        {
            "messages": [
                *TOOL_TURN,
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}],
                },
            ]
        },
        "messages.2.content.0.tool_use_id",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}],
                }
            ]
        },
        "messages.0.content.0.tool_use_id",
    ),
    ({"tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "any"}, "tools": None}, "tool_choice"),
    ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools.0.input_schema"),
    ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools.0.name"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://example.com/a.png"},
                        }
                    ],
                }
            ]
        },
        "messages.0.content.0",
    ),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 60}}, "thinking.budget_tokens"),
    (
        {"thinking": {"type": "enabled", "budget_tokens": 10}, "tool_choice": {"type": "any"}},
        "tool_choice",
    ),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 100000}, "max_tokens"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[p for _, p in BAD])
def test_bad_requests_get_anthropic_errors(server, fields, param):
    body = {"model": "nanoseek", "max_tokens": 60, "messages": user(HELLO), "tools": TOOLS}
    body = {k: v for k, v in (body | fields).items() if v is not None}
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == 400, r.text
    error = r.json()
    assert set(error) == {"type", "error"} and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert param in error["error"]["message"]
    clean = {"model": "nanoseek", "max_tokens": 5, "messages": user(HELLO)}
    ok = httpx.post(server.url + "/v1/messages", json=clean, headers={"x-api-key": KEY})
    assert ok.status_code == 200  # the server still answers
    assert httpx.get(server.url + "/health").status_code == 200


def test_sdk_raises_bad_request(client):
    with pytest.raises(anthropic.BadRequestError) as e:
        create(client, [{"role": "assistant", "content": "Hi"}])
    assert e.value.status_code == 400
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert create(client, user(HELLO)).content[0].text == HELLO_ANSWER


def test_refusals_before_the_route_are_anthropic_shaped(server):
    r = httpx.post(
        server.url + "/v1/messages",
        content=b"{}",
        headers={"x-api-key": KEY, "content-type": "text/plain"},
    )
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/messages", headers={"x-api-key": KEY})
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = httpx.post(
        server.url + "/v1/messages",
        content=b"{not json",
        headers={"x-api-key": KEY, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["type"] == "error"


def anthropic_problems(status: int, text: str, media: str) -> list[str]:
    """What is wrong with an answer of /v1/messages: a 5xx, an error that is not Anthropic's error
    object, a stream whose events are not named as their data's type."""
    if status >= 500:
        return [f"{status}: {text[:300]}"]
    if status >= 400:
        body = json.loads(text)
        error = body.get("error") if isinstance(body, dict) else None
        if body.get("type") != "error" or not isinstance(error, dict):
            return [f"not an error object: {text[:300]}"]
        if set(error) != {"type", "message"} or not all(isinstance(v, str) for v in error.values()):
            return [f"error fields: {text[:300]}"]
        return []
    if not media.startswith("text/event-stream"):
        return [] if json.loads(text)["type"] == "message" else [f"not a message: {text[:300]}"]
    found = []
    for chunk in filter(str.strip, text.split("\n\n")):
        name, data = chunk.split("\n")
        if json.loads(data.removeprefix("data: "))["type"] != name.removeprefix("event: "):
            found.append(f"event {chunk[:300]}")
    return found


def test_schema_fuzzing_finds_no_server_error(server):
    """Bodies drawn from the served /openapi.json's schema of /v1/messages (valid, wrong values in
    its fields, any JSON): no 5xx, every error Anthropic's error object."""
    doc = httpx.get(server.url + "/openapi.json").json()
    schema = serve_fuzz.request_schema(doc, "/v1/messages")
    client = httpx.Client(timeout=60)
    found = []
    statuses = []

    @settings(
        max_examples=100,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(serve_fuzz.bodies(schema))
    def fuzz(body):
        headers = {"x-api-key": KEY, "Content-Type": "application/json"}
        raw = json.dumps(body).encode()
        with client.stream("POST", server.url + "/v1/messages", content=raw, headers=headers) as r:
            text = r.read().decode("utf-8", "replace")
            media = r.headers.get("content-type", "")
        statuses.append(r.status_code)
        found.extend(anthropic_problems(r.status_code, text, media))

    fuzz()
    assert not found, found[:5]
    assert 200 in statuses and 400 in statuses


def test_an_error_mid_stream_is_an_error_event(checkpoint):
    """Past the request timeout (the engine held still): a 504 as Anthropic's error object, and in
    a stream an `event: error` that ends it (no OpenAI [DONE])."""
    config = ServerConfig(request_timeout=1.0)
    with InProcessServer(create_app(config, lambda: load_checkpoint(checkpoint))) as s:
        while httpx.get(s.url + "/health").status_code != 200:
            time.sleep(0.05)
        body = {"model": "nanoseek", "max_tokens": 50, "messages": user(HELLO)}
        with s.state.engine._lock:  # the engine cannot step: nothing can finish in time
            r = httpx.post(s.url + "/v1/messages", json=body, timeout=60)
            assert r.status_code == 504
            assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
            streamed = {**body, "stream": True}
            text = httpx.post(s.url + "/v1/messages", json=streamed, timeout=60).text
        events = [chunk.split("\n") for chunk in text.split("\n\n") if chunk.strip()]
        name, data = events[-1]
        assert name == "event: error" and "[DONE]" not in text
        error = json.loads(data.removeprefix("data: "))
        assert error["type"] == "error" and "took longer" in error["error"]["message"]
