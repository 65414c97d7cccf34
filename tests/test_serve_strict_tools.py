"""Constrained tool calls (serve/openai.py `tool_grammar` on serve/grammar.py's
`tool_calls_grammar`): the grammar on hand-built tokens for each place it can start; then a real
server and the official openai client. A random-weight model sampled at temperature 1 under
tool_choice "required" and a named function writes calls whose arguments always validate
(`jsonschema`) against schemas with a nested object, an array, an enum and bounded integers; under
"auto" with a strict function, a model trained here to open a call with arguments that break the
schema writes valid ones instead (the grammar engages at `<｜tool▁calls▁begin｜>`), and answers a
greeting freely; schemas the engine cannot compile are a 400 naming the tool; /tokenize counts the
ids the chat endpoint runs, tools and prefilled call included."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from nanoseek import save_model
from nanoseek.serve import protocol
from nanoseek.serve.chat_format import TokenTable, chat_prompt, chat_request_prompt
from nanoseek.serve.grammar import GrammarProcessor, GrammarVocab, tool_calls_grammar
from nanoseek.serve.tools import generation_prefix

from serve_helpers import (
    ServerProcess,
    build_random_checkpoint,
    build_tokenizer,
    memorised_tensors,
    train_to_margin,
)

# Every string, array and number is bounded, so the longest arguments are known: 14 characters of
# strings at most 12 bytes each (a \uXXXX\uXXXX pair), 2 array items, up to WS_MAX (20) bytes of
# whitespace in each of the ~40 gaps between tokens, ~90 bytes of keys and punctuation: under 1100
# bytes, so under 1100 tokens (none is empty).
FORECAST = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "when": {
            "type": "object",
            "properties": {
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "tags": {"type": "array", "items": {"enum": ["am", "pm"]}, "maxItems": 2},
            },
            "required": ["hour", "tags"],
            "additionalProperties": False,
        },
        "note": {"type": ["string", "null"], "maxLength": 6},
    },
    "required": ["city", "unit", "days", "when", "note"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -999, "maximum": 999},
        "b": {"type": "integer", "minimum": -999, "maximum": 999},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"forecast": FORECAST, "add": ADD}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "forecast", "parameters": FORECAST, "strict": True},
    },
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]
MAX_TOKENS = 1150
CONTEXT = 2048
NO_THINKING = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def vocab(tok):
    return GrammarVocab(TokenTable(tok), tok)


# ------------------------------------------------------------------------------------ the grammar


def call_ids(tok, style, name, args):
    s = tok.special_ids
    if style == "v3":
        head = [*tok.encode("function"), s["tool_sep"], *tok.encode(f"{name}\n```json\n")]
        return [s["tool_call_begin"], *head, *tok.encode(args + "\n```"), s["tool_call_end"]]
    return [s["tool_call_begin"], *tok.encode(name), s["tool_sep"], *tok.encode(args)] + [
        s["tool_call_end"]
    ]


def accepts(vocab, grammar_text, ids):
    m = vocab.compile(grammar_text).start.deep_copy()
    return m.consume_tokens(ids) and m.is_accepting()


@pytest.mark.parametrize("style", ["v3", "v31"])
def test_a_grammar_that_starts_inside_the_first_call(vocab, tok, style):
    """ "call": after `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>` (required); "arguments": after
    the head of the first tool's call (a named function)."""
    s = tok.special_ids
    end = s["tool_calls_end"]
    tools = [("add", ADD), ("forecast", FORECAST)]
    add = call_ids(tok, style, "add", '{"a": 1, "b": -2}')
    second = call_ids(tok, style, "add", '{"a": 3, "b": 4}')
    required = tool_calls_grammar(vocab, tools, style=style, prefilled="call")
    assert accepts(vocab, required, [*add[1:], end])
    assert accepts(vocab, required, [*add[1:], *second, end])  # parallel
    assert not accepts(vocab, required, [*add, end])  # the call is already open
    assert not accepts(vocab, required, [*call_ids(tok, style, "sub", "{}")[1:], end])
    assert not accepts(vocab, required, [*call_ids(tok, style, "add", '{"a": 1}')[1:], end])
    single = tool_calls_grammar(vocab, tools, style=style, prefilled="call", parallel=False)
    assert not accepts(vocab, single, [*add[1:], *second, end])
    named = tool_calls_grammar(vocab, tools, style=style, prefilled="arguments", parallel=False)
    args_start = (
        len(add)
        - len(tok.encode('{"a": 1, "b": -2}'))
        - 1
        - (style == "v3") * len(tok.encode("\n```"))
    )
    assert accepts(vocab, named, [*add[args_start:], end])
    assert not accepts(vocab, named, [*tok.encode('{"a": 1000, "b": 0}'), *add[-1:], end])


def test_a_forced_call_leaves_only_the_close_and_eos(vocab, tok):
    s = tok.special_ids
    named = tool_calls_grammar(vocab, [("add", ADD)], style="v31", prefilled="arguments")
    proc = GrammarProcessor(vocab, vocab.compile(named))
    args = tok.encode('{"a":1,"b":2}')
    allowed = proc(args, __import__("torch").zeros(tok.vocab_size)).isfinite()
    assert allowed.nonzero().flatten().tolist() == [s["tool_call_end"]]
    done = [*args, s["tool_call_end"], s["tool_calls_end"]]
    allowed = proc(done, __import__("torch").zeros(tok.vocab_size)).isfinite()
    assert allowed.nonzero().flatten().tolist() == [tok.eos_id]


# -------------------------------------------------------------------------------- a random model


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    path = build_random_checkpoint(tmp_path_factory.mktemp("strict") / "model", context=CONTEXT)
    with ServerProcess(path, "--max-tokens", str(CONTEXT - 100)) as s:
        yield s.wait_ready()


def client_of(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)


def user(text):
    return [{"role": "user", "content": text}]


def check_calls(choice, names):
    """Every call of a finished choice names one of `names` and its arguments validate."""
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return choice.message.tool_calls


def test_required_calls_sampled_at_temperature_one_all_validate(random_server):
    r = client_of(random_server).chat.completions.create(
        model="nanoseek",
        messages=user("Weather or sums?"),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=0,
        n=20,
        max_tokens=MAX_TOKENS,
        extra_body=NO_THINKING,
    )
    assert len(r.choices) == 20
    for c in r.choices:
        [_] = check_calls(c, {"forecast", "add"})  # parallel_tool_calls false: one call
        assert c.message.content is None
    # the samples differ (the model's own choices, within the grammar)
    assert len({c.message.tool_calls[0].function.arguments for c in r.choices}) > 5


def test_named_calls_sampled_at_temperature_one_all_validate(random_server):
    r = client_of(random_server).chat.completions.create(
        model="nanoseek",
        messages=user("Forecast?"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "forecast"}},
        temperature=1.0,
        seed=1,
        n=16,
        max_tokens=MAX_TOKENS,
        extra_body=NO_THINKING,
    )
    docs = []
    for c in r.choices:
        [call] = check_calls(c, {"forecast"})  # a named function: exactly that one call
        docs.append(json.loads(call.function.arguments))
    assert len({json.dumps(d, sort_keys=True) for d in docs}) > 5


def test_parallel_required_calls_and_streaming(random_server):
    """parallel_tool_calls (the default): one call or more, each valid; a call cut off by
    max_tokens would come back with finish_reason "length", so every finished choice is whole."""
    client = client_of(random_server)
    r = client.chat.completions.create(
        model="nanoseek",
        messages=user("Sums?"),
        tools=[TOOLS[1]],
        tool_choice="required",
        temperature=1.0,
        seed=2,
        n=8,
        max_tokens=MAX_TOKENS,
        extra_body=NO_THINKING,
    )
    for c in r.choices:
        if c.finish_reason == "tool_calls":
            check_calls(c, {"add"})
        else:  # only max_tokens stops a run of calls early; the ones before the last are whole
            assert c.finish_reason == "length"
            for call in c.message.tool_calls[:-1]:
                jsonschema.validate(json.loads(call.function.arguments), ADD)
    stream = client.chat.completions.create(
        model="nanoseek",
        messages=user("Forecast?"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "forecast"}},
        temperature=1.0,
        seed=3,
        max_tokens=MAX_TOKENS,
        stream=True,
        extra_body=NO_THINKING,
    )
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for piece in c.delta.tool_calls or []:
                if piece.id is not None:
                    calls[piece.index] = [piece.function.name, ""]
                else:
                    calls[piece.index][1] += piece.function.arguments
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0] and calls[0][0] == "forecast"
    jsonschema.validate(json.loads(calls[0][1]), FORECAST)


BAD_SCHEMA = {  # a valid JSON schema that no value satisfies: llguidance refuses it
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": 5, "maximum": 1}},
    "required": ["x"],
}


@pytest.mark.parametrize(
    "strict, choice, status",
    [
        (True, "auto", 400),
        (False, "required", 400),
        (False, {"type": "function", "function": {"name": "bad"}}, 400),
        (False, "auto", 200),  # not strict, not forced: the arguments are free, nothing to compile
        (True, {"type": "function", "function": {"name": "add"}}, 200),  # not the one called
    ],
)
def test_a_schema_the_engine_cannot_compile_is_a_400_naming_the_tool(
    random_server, strict, choice, status
):
    bad = {"type": "function", "function": {"name": "bad", "parameters": BAD_SCHEMA}}
    if strict:
        bad["function"]["strict"] = True
    body = {
        "messages": user("x"),
        "tools": [TOOLS[1], bad],
        "tool_choice": choice,
        "max_tokens": 30,
        **NO_THINKING,
    }
    r = httpx.post(random_server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == status, r.text
    if status == 400:
        error = r.json()["error"]
        assert error["param"] == "tools.1.function.parameters", error
        assert "cannot compile" in error["message"] and "unsatisfiable" in error["message"], error
    assert httpx.get(random_server.url + "/health", timeout=10).status_code == 200


def test_min_tokens_cannot_go_with_a_constrained_call(random_server):
    body = {
        "messages": user("x"),
        "tools": TOOLS,
        "tool_choice": "required",
        "min_tokens": 5,
        "max_tokens": 30,
    }
    r = httpx.post(random_server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text


# ---------------------------------------------------------------------------------------- /tokenize


@pytest.mark.parametrize(
    "choice",
    ["auto", "none", "required", {"type": "function", "function": {"name": "add"}}],
)
def test_tokenize_counts_what_the_chat_endpoint_runs(random_server, tok, choice):
    history = [
        *user("Add 2 and 3"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        *user("And 4 and 5?"),
    ]
    fields = {"messages": history, "tools": TOOLS, "tool_choice": choice}
    r = httpx.post(random_server.url + "/tokenize", json=fields, timeout=60)
    assert r.status_code == 200, r.text
    counted = r.json()
    chat = httpx.post(
        random_server.url + "/v1/chat/completions", json={**fields, "max_tokens": 1}, timeout=120
    )
    assert chat.status_code == 200, chat.text
    assert counted["count"] == chat.json()["usage"]["prompt_tokens"] == len(counted["tokens"])
    # and the ids are the chat endpoint's function's, computed here
    req = protocol.ChatCompletionRequest.model_validate(fields)
    ids, _, prefix = chat_request_prompt(
        tok,
        [m.as_dict() for m in req.messages],
        True,
        [t.as_dict() for t in req.tools],
        req.tool_choice_name,
    )
    assert counted["tokens"] == ids
    assert prefix == generation_prefix("raw", req.tool_choice_name)
    text = tok.decode(ids)
    assert '"name": "forecast"' in text and '{"a": 2, "b": 3}' in text
    # without the generation prompt the history renders as the template has it, tools included
    r = httpx.post(
        random_server.url + "/tokenize",
        json={**fields, "add_generation_prompt": False},
        timeout=60,
    )
    plain = [{k: v for k, v in m.items() if v is not None} for m in history]
    assert r.json()["tokens"] == tok.apply_chat_template(
        plain, tools=[t.as_dict() for t in req.tools], sanitize=True
    )


def test_tokenize_checks_tools_as_the_chat_endpoint_does(random_server):
    fields = {
        "messages": user("x"),
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    }
    r = httpx.post(random_server.url + "/tokenize", json=fields, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice.function.name"
    continued = {
        "messages": [*user("x"), {"role": "assistant", "content": "Sure"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    r = httpx.post(random_server.url + "/tokenize", json=continued, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


# --------------------------------------------------------------------------- auto, a trained model

CITY = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Oslo", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
STRICT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": CITY, "strict": True},
    }
]
WEATHER_Q = "Weather in Paris?"
THOUGHT = "The user asks for the weather."
LEARNED_ARGS = '{"city": "Paris"}'  # what the model learns to write: the schema refuses it
HELLO = "Hello"
HELLO_THOUGHT = "The user greets me."
HELLO_ANSWER = "Hello! How can I help?"


@pytest.fixture(scope="module")
def trained_server(tmp_path_factory):
    """A model trained (every learned token winning by 2 nats) to think, then open a call of
    get_weather with LEARNED_ARGS, which break the strict schema; and to greet back on HELLO."""
    tok = build_tokenizer()
    tools = [protocol.Tool.model_validate(t).as_dict() for t in STRICT_TOOLS]
    call = {"id": "call_x", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": LEARNED_ARGS}
    examples = [
        (
            user(WEATHER_Q),
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": THOUGHT,
                "tool_calls": [call],
            },
        ),
        (
            user(HELLO),
            {"role": "assistant", "content": HELLO_ANSWER, "reasoning_content": HELLO_THOUGHT},
        ),
    ]
    rows = []
    for prompt, reply in examples:
        context, _ = chat_prompt(tok, prompt, True, tools)
        ids = tok.apply_chat_template([*prompt, reply], tools=tools, sanitize=True)
        assert ids[: len(context)] == context
        rows.append((ids, len(context) - 1, True))
    inputs, targets = memorised_tensors(rows, tok.eos_id)
    model = train_to_margin(tok, inputs, targets, steps=150)
    path = tmp_path_factory.mktemp("trained") / "model"
    save_model(model.eval(), path, tokenizer=tok)
    with ServerProcess(path, "--max-tokens", "200") as s:
        yield s.wait_ready()


@pytest.mark.parametrize("stream", [False, True])
def test_auto_constrains_the_call_the_model_opens(trained_server, stream):
    """Greedy decoding replays what the model learned up to the call's arguments; there the
    grammar takes over: the arguments validate, though the model learned ones that do not."""
    client = client_of(trained_server)
    kw = {"model": "nanoseek", "tools": STRICT_TOOLS, "temperature": 0, "max_tokens": 120}
    if not stream:
        c = client.chat.completions.create(messages=user(WEATHER_Q), **kw).choices[0]
        assert c.finish_reason == "tool_calls" and c.message.reasoning_content == THOUGHT
        [call] = c.message.tool_calls
        name, arguments = call.function.name, call.function.arguments
    else:
        pieces = []
        name = None
        finish = None
        for chunk in client.chat.completions.create(messages=user(WEATHER_Q), stream=True, **kw):
            for c in chunk.choices:
                for piece in c.delta.tool_calls or []:
                    name = piece.function.name or name
                    pieces.append(piece.function.arguments or "")
                finish = c.finish_reason or finish
        arguments = "".join(pieces)
        assert finish == "tool_calls"
    assert name == "get_weather" and arguments != LEARNED_ARGS
    jsonschema.validate(json.loads(arguments), CITY)
    # the output is free until a call opens: the greeting is what the model learned
    c = client.chat.completions.create(messages=user(HELLO), **kw).choices[0]
    assert (c.message.content, c.message.tool_calls, c.finish_reason) == (
        HELLO_ANSWER,
        None,
        "stop",
    )
