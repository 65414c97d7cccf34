"""Tool calling through a real `nanoseek serve` subprocess and the official openai client: a tiny
model trained here to call a tool (tool_choice "auto": it decides), to answer from the tool's
result, and to continue forced calls ("required", a named function); "none"; bad tool requests
(400 naming the field, the server still up); and a checkpoint whose tokenizer has neither the tool
tokens nor nanoseek's own, served with its own chat template."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from nanoseek import Transformer, save_model
from nanoseek.serve import protocol
from nanoseek.serve.chat_format import EngineTokenizer, chat_prompt
from nanoseek.serve.tools import ToolCallRules, ToolParser, generation_prefix
from nanoseek.tokenizer import load_tokenizer

from helpers import CHATML_TEMPLATE, foreign_tokenizer, tiny_config
from serve_helpers import ServerProcess, build_tokenizer, memorised_tensors, train_to_margin

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "The time now", "parameters": {}},
    },
]
WEATHER_Q = "Weather in Paris?"
CALL_THOUGHT = "The user asks for the weather."
ARGS = '{"city": "Paris"}'
RESULT = "sunny, 21 C"
ANSWER_THOUGHT = "The tool answered."
ANSWER = "It is sunny in Paris."
HELLO = "Hello"
HELLO_THOUGHT = "The user greets me."
HELLO_ANSWER = "Hello! How can I help?"


def assistant_call(name: str, arguments: str) -> dict:
    call = {"id": "call_x", "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def build_tool_checkpoint(path):
    """A tiny model that, given TOOLS: calls get_weather for WEATHER_Q after a thought; answers
    from the tool's result; greets back on HELLO without a call; and continues the prompts that
    tool_choice "required" (get_time) and "get_weather" prefill for HELLO. Prompts are built by
    the server's own code, so they are what the server will send."""
    tok = build_tokenizer()
    tools = [protocol.Tool.model_validate(t).as_dict() for t in TOOLS]
    weather = [{"role": "user", "content": WEATHER_Q}]
    hello = [{"role": "user", "content": HELLO}]
    after_tool = [
        *weather,
        assistant_call("get_weather", ARGS),
        {"role": "tool", "tool_call_id": "call_x", "content": RESULT},
    ]
    thought_call = {**assistant_call("get_weather", ARGS), "reasoning_content": CALL_THOUGHT}
    examples = [  # (prompt, thinking, tool_choice, reply)
        (weather, True, "auto", thought_call),
        (
            after_tool,
            True,
            "auto",
            {"role": "assistant", "content": ANSWER, "reasoning_content": ANSWER_THOUGHT},
        ),
        (
            hello,
            True,
            "auto",
            {"role": "assistant", "content": HELLO_ANSWER, "reasoning_content": HELLO_THOUGHT},
        ),
        (hello, False, "required", assistant_call("get_time", "{}")),
        (hello, False, "get_weather", assistant_call("get_weather", ARGS)),
    ]
    rows = []
    for prompt, thinking, choice, reply in examples:
        context, _ = chat_prompt(tok, prompt, thinking, tools)
        context += tok.encode(generation_prefix("raw", choice), allow_special=True)
        ids = tok.apply_chat_template([*prompt, reply], tools=tools, sanitize=True)
        assert ids[: len(context)] == context
        rows.append((ids, len(context) - 1, True))
    inputs, targets = memorised_tensors(rows, tok.eos_id)
    model = train_to_margin(tok, inputs, targets, steps=150)
    save_model(model.eval(), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = build_tool_checkpoint(tmp_path_factory.mktemp("tools") / "model")
    with ServerProcess(ckpt, "--max-tokens", "200") as s:
        yield s.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(client, messages, stream=False, **kw):
    """A greedy chat request; streamed ones are assembled as a client does (calls by index)."""
    kw = {"messages": messages, "temperature": 0, "max_tokens": 80, **kw}
    if not stream:
        choice = client.chat.completions.create(model="nanoseek", **kw).choices[0]
        m = choice.message
        calls = [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return m.content, getattr(m, "reasoning_content", None), calls, choice.finish_reason
    content = ""
    reasoning = ""
    calls: dict[int, list] = {}
    finish = None
    for chunk in client.chat.completions.create(model="nanoseek", stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for piece in delta.tool_calls or []:
            if piece.id is not None:  # the first piece of a call: index, id, type, name, ""
                assert piece.index == len(calls) and piece.type == "function"
                assert piece.function.name and piece.function.arguments == ""
                calls[piece.index] = [piece.id, piece.function.name, ""]
            else:
                assert piece.function.name is None
                calls[piece.index][2] += piece.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return content or None, reasoning or None, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_round_trip_with_auto_choice(client, stream):
    messages = [{"role": "user", "content": WEATHER_Q}]
    content, reasoning, calls, finish = ask(client, messages, stream, tools=TOOLS)
    assert finish == "tool_calls" and content is None and reasoning == CALL_THOUGHT
    [(call_id, name, arguments)] = calls
    assert call_id.startswith("call_") and name == "get_weather" and arguments == ARGS
    assert json.loads(arguments) == {"city": "Paris"}
    # the client runs the tool and sends its result back
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": ARGS}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": RESULT},
    ]
    content, reasoning, calls, finish = ask(client, messages, stream, tools=TOOLS)
    assert (content, reasoning, calls, finish) == (ANSWER, ANSWER_THOUGHT, [], "stop")
    # the model chose: on a greeting it answers without a call
    greeting = [{"role": "user", "content": HELLO}]
    assert ask(client, greeting, stream, tools=TOOLS) == (HELLO_ANSWER, HELLO_THOUGHT, [], "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_forced_choices(client, stream):
    greeting = [{"role": "user", "content": HELLO}]
    content, reasoning, calls, finish = ask(
        client, greeting, stream, tools=TOOLS, tool_choice="required"
    )
    assert (content, reasoning, [c[1:] for c in calls]) == (None, None, [("get_time", "{}")])
    assert finish == "tool_calls"
    named = {"type": "function", "function": {"name": "get_weather"}}
    content, reasoning, calls, finish = ask(
        client, greeting, stream, tools=TOOLS, tool_choice=named
    )
    assert (content, [c[1:] for c in calls], finish) == (
        None,
        [("get_weather", ARGS)],
        "tool_calls",
    )


@pytest.mark.parametrize("stream", [False, True])
def test_choice_none_cannot_call(client, stream):
    weather = [{"role": "user", "content": WEATHER_Q}]
    content, reasoning, calls, finish = ask(
        client, weather, stream, tools=TOOLS, tool_choice="none", max_tokens=30
    )
    # the thought is what the model learned; the call it would open next is masked
    assert reasoning == CALL_THOUGHT and calls == [] and finish in ("stop", "length")
    assert "tool▁" not in (content or "")


def test_call_rules():
    special = {"tool_calls_begin": 1, "tool_call_begin": 2, "tool_call_end": 3}
    none = ToolCallRules(special, allow_calls=False, parallel=True)
    assert none([], torch.zeros(5)).tolist() == [0, float("-inf"), 0, 0, 0]
    single = ToolCallRules(special, allow_calls=True, parallel=False)
    assert single([1, 2, 9], torch.zeros(5)).tolist() == [0] * 5
    assert single([1, 2, 9, 3], torch.zeros(5)).tolist() == [0, 0, float("-inf"), 0, 0]


BAD = [
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
            ]
        },
        "tools.0.function.parameters",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"properties": {"a": {"minimum": "x"}}},
                    },
                }
            ]
        },
        "tools.0.function.parameters",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}]},
        "messages.1.tool_call_id",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                assistant_call("get_weather", ARGS),
                {"role": "tool", "tool_call_id": "call_other", "content": "r"},
            ]
        },
        "messages.2.tool_call_id",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                assistant_call("get_weather", ARGS),
                {"role": "tool", "tool_call_id": "call_x", "content": "r"},
                {"role": "tool", "tool_call_id": "call_x", "content": "again"},
            ]
        },
        "messages.3.tool_call_id",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [assistant_call("f", "{}")["tool_calls"][0]],
                }
            ]
        },
        "messages.0.tool_calls",
    ),
]


@pytest.mark.parametrize("fields,param", BAD)
def test_bad_tool_requests_name_the_field(server, fields, param):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def foreign_checkpoint(path):
    """Random weights; a ChatML-style tokenizer with its own template: no nanoseek tokens, no tool
    tokens, no <think>, no FIM tokens."""
    foreign_tokenizer(path)
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256))
    save_model(model.eval(), path, tokenizer=tok)
    assert load_tokenizer(path).chat_template == CHATML_TEMPLATE  # saved back as it was
    return path


def test_checkpoint_with_its_own_template(tmp_path):
    with ServerProcess(foreign_checkpoint(tmp_path / "model"), "--max-tokens", "8") as s:
        s.wait_ready()
        url = s.url
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(
            load_tokenizer(tmp_path / "model").encode(
                "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", allow_special=True
            )
        )
        refusals = [
            ({**chat, "tools": TOOLS}, "tools", "tool-call tokens"),
            ({**chat, "thinking": {"type": "enabled"}}, "thinking", "<think>"),
            (
                {**chat, "chat_template_kwargs": {"thinking": False}},
                "chat_template_kwargs.thinking",
                "<think>",
            ),
        ]
        for body, param, words in refusals:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert words in r.json()["error"]["message"]
        fim = {"prompt": "def f(", "suffix": ")", "max_tokens": 2}
        r = httpx.post(url + "/v1/completions", json=fim, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix", r.text
        r = httpx.post(
            url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 200, r.text


def test_round_trip_sending_back_the_clients_message_object(client):
    """The pattern of OpenAI's guide: append the response's message object itself."""
    messages = [{"role": "user", "content": WEATHER_Q}]
    kw = {"model": "nanoseek", "tools": TOOLS, "temperature": 0, "max_tokens": 80}
    message = client.chat.completions.create(messages=messages, **kw).choices[0].message
    [tool_call] = message.tool_calls
    messages += [message, {"role": "tool", "tool_call_id": tool_call.id, "content": RESULT}]
    reply = client.chat.completions.create(messages=messages, **kw).choices[0]
    assert (reply.message.content, reply.finish_reason) == (ANSWER, "stop")


def test_engine_text_keeps_tool_tokens_and_plain_requests_drop_them():
    tok = build_tokenizer()
    ids = tok.encode("a<｜tool▁sep｜>b<｜tool▁calls▁begin｜>c", allow_special=True)
    text = EngineTokenizer(tok).decode(ids, skip_special_tokens=True)
    assert text == "a<｜tool▁sep｜>b<｜tool▁calls▁begin｜>c"  # what the parser reads
    assert tok.decode(ids, skip_special_tokens=True) == "abc"
    parser = ToolParser(None)  # a request without tools (chat or completions)
    shown = [parser.feed(piece)[0] for piece in (text[:3], text[3:12], text[12:])]
    assert "".join(shown) + parser.finish()[0] == "abc" and parser.calls == []
