"""Structured outputs on llguidance (serve/grammar.py): the grammar builders and the logits
processor on hand-built token sequences (tool calls included), then a real server driven by the
official openai client: response_format json_schema (50 samples at temperature 1, each validated
with jsonschema), what happens when max_tokens runs out, thinking, bad schemas, and vLLM's guided_*
extras."""

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

from nanoseek import Transformer
from nanoseek.engine import Engine, SamplingParams
from nanoseek.serve.chat_format import EngineTokenizer, TokenTable, chat_prompt
from nanoseek.serve.grammar import (
    WS_MAX,
    GrammarError,
    GrammarProcessor,
    GrammarVocab,
    json_schema_grammar,
    tool_calls_grammar,
    wrapped_json_grammar,
)

from helpers import tiny_config
from serve_helpers import (
    SCRIPT,
    ServerProcess,
    build_random_checkpoint,
    build_tokenizer,
    shared_checkpoint,
)

HELLO, HELLO_THOUGHT, _ = SCRIPT[0]

# A nested object, an array, an enum, bounded integers, maxLength strings, optional fields (and a
# nullable one). Every string is bounded, so the longest document the schema allows is known: 36
# characters of strings at most 12 bytes each (a \uXXXX\uXXXX surrogate pair), WS_MAX whitespace
# bytes in each of the 38 gaps between tokens, ~100 bytes of keys and punctuation: under 1300
# bytes, so under 1300 tokens (none is empty).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "floor": {"type": "integer", "minimum": -2, "maximum": 30},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
        "nickname": {"type": ["string", "null"], "maxLength": 6},
    },
    "required": ["name", "kind", "age", "home"],
    "additionalProperties": False,
}
WORST_CASE_TOKENS = 1500
CONTEXT = 2048


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def vocab(tok):
    return GrammarVocab(TokenTable(tok), tok)


def test_the_token_table_holds_every_tokens_bytes(vocab, tok):
    assert vocab.tokenizer.vocab_size == tok.vocab_size
    text = "héllo {} 中文 🙂"
    assert vocab.tokenizer.decode_bytes(tok.encode(text)) == text.encode()
    assert vocab.tokenizer.is_special_token(tok.special_ids["end_think"])


def allowed(proc, ids, size):
    return torch.isfinite(proc(ids, torch.zeros(size))).nonzero().flatten().tolist()


# ------------------------------------------------------------------------------------ on its own


def test_schema_documents_are_accepted_and_others_refused(vocab, tok):
    grammar = vocab.compile(json_schema_grammar(SCHEMA))
    good = {"name": "Tom", "kind": "cat", "age": 7, "home": {"city": "Oslo"}, "nickname": None}
    bad = [
        {**good, "kind": "cow"},  # not in the enum
        {**good, "age": 121},  # above the maximum
        {**good, "name": "Bartholomew"},  # over maxLength
        {k: v for k, v in good.items() if k != "home"},  # a required field missing
        {**good, "extra": 1},  # additionalProperties: false
        {**good, "tags": ["a", "b", "c", "d"]},  # over maxItems
    ]
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for doc in [good, *bad]:
        m = grammar.start.deep_copy()
        consumed = m.consume_tokens(tok.encode(json.dumps(doc))) and m.is_accepting()
        assert consumed == validator.is_valid(doc) == (doc is good), doc


def test_json_whitespace_is_capped(vocab, tok):
    grammar = vocab.compile(json_schema_grammar({"type": "object"}))
    for text, ok in [
        ('{"a":' + " " * WS_MAX + "1}", True),
        ('{"a":' + " " * (WS_MAX + 1) + "1}", False),
        (' {"a": 1}', False),  # nothing before the value
    ]:
        m = grammar.start.deep_copy()
        assert m.consume_tokens(tok.encode(text)) == ok, text


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "strin"}, "strin"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"properties": {"x": {"$ref": "#/$defs/missing"}}}, "/$defs/missing"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    ],
)
def test_schemas_the_engine_cannot_compile_say_why(vocab, schema, reason):
    with pytest.raises(GrammarError, match=re.escape(reason)) as e:
        vocab.build("json_schema", schema, "response_format.json_schema.schema")
    assert e.value.param == "response_format.json_schema.schema"


def tool_call(tok, style, name, args):
    s = tok.special_ids
    if style == "v3":
        body = [
            *tok.encode("function"),
            s["tool_sep"],
            *tok.encode(f"{name}\n```json\n{args}\n```"),
        ]
    else:
        body = [*tok.encode(name), s["tool_sep"], *tok.encode(args)]
    return [s["tool_call_begin"], *body, s["tool_call_end"]]


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "maximum": 7}},
    "required": ["city"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("style", ["v3", "v31"])
@pytest.mark.parametrize("opened", [False, True])
def test_tool_call_grammar_on_hand_built_tokens(vocab, tok, style, opened):
    s = tok.special_ids
    tools = [("get_weather", WEATHER), ("add", ADD)]
    first = tool_call(tok, style, "get_weather", '{"city": "Paris", "days": 3}')
    second = tool_call(tok, style, "add", '{"a": 1.5, "b": -2}')
    between = tok.encode("\n") if style == "v3" else []
    head = [] if opened else [s["tool_calls_begin"]]

    def run(ids, parallel=True):
        grammar = tool_calls_grammar(vocab, tools, style=style, parallel=parallel, opened=opened)
        m = vocab.compile(grammar).start.deep_copy()
        return m.consume_tokens(ids) and m.is_accepting()

    assert run([*head, *first, s["tool_calls_end"]])
    assert run([*head, *first, *between, *second, s["tool_calls_end"]])
    assert run([*head, *first, *second, s["tool_calls_end"]])  # R1 leaves the newline out
    assert not run([*head, *first, *between, *second, s["tool_calls_end"]], parallel=False)
    assert not run(
        [*head, *tool_call(tok, style, "get_weather", '{"days": 3}'), s["tool_calls_end"]]
    )
    assert not run([*head, *tool_call(tok, style, "get_weather", '{"city": "P", "days": 8}')])
    assert not run([*head, *tool_call(tok, style, "sub", '{"a": 1, "b": 2}'), s["tool_calls_end"]])
    assert not run([*head, *first])  # the calls must be closed
    if not opened:
        assert not run([*first, s["tool_calls_end"]])


def test_a_trigger_engages_the_grammar_once_the_model_opens_a_call(vocab, tok):
    s = tok.special_ids
    grammar = vocab.compile(tool_calls_grammar(vocab, [("add", ADD)], style="v31", opened=True))
    proc = GrammarProcessor(vocab, grammar, trigger=s["tool_calls_begin"])
    text = tok.encode("Let me add.")
    assert len(allowed(proc, text, tok.vocab_size)) == tok.vocab_size  # free text, EOS included
    opened = [*text, s["tool_calls_begin"]]
    assert allowed(proc, opened, tok.vocab_size) == [s["tool_call_begin"]]
    call = tool_call(tok, "v31", "add", '{"a": 1, "b": 2}')
    assert allowed(proc, [*opened, *call], tok.vocab_size) == sorted(
        [s["tool_calls_end"], s["tool_call_begin"]]
    )
    assert allowed(proc, [*opened, *call, s["tool_calls_end"]], tok.vocab_size) == [tok.eos_id]


def test_a_prefix_a_schema_and_a_suffix(vocab, tok):
    s = tok.special_ids
    parts = [s["tool_call_begin"], "add", s["tool_sep"], ADD, s["tool_call_end"]]
    grammar = vocab.compile(wrapped_json_grammar(vocab, parts))
    proc = GrammarProcessor(vocab, grammar)
    assert allowed(proc, [], tok.vocab_size) == [s["tool_call_begin"]]
    ids = [s["tool_call_begin"], *tok.encode("add"), s["tool_sep"], *tok.encode('{"a":1,"b":2}')]
    assert allowed(proc, ids, tok.vocab_size) == [s["tool_call_end"]]
    m = grammar.start.deep_copy()
    assert not m.consume_tokens([*ids[:-1], *tok.encode(',"c":3}')])


def test_outputs_sharing_a_processor_each_get_their_own_mask(vocab, tok):
    """Interleaved outputs, and a cache too small to keep their prefixes (so they are replayed):
    every mask equals the one a processor of each output's own gives."""
    grammar = vocab.build("json_schema", SCHEMA)
    docs = [
        {"name": "Tom", "kind": "cat", "age": 7, "home": {"city": "Oslo"}},
        {"name": "Rex", "kind": "dog", "age": 12, "tags": ["x"], "home": {"city": "Rome"}},
    ]
    outputs = [tok.encode(json.dumps(d)) for d in docs]
    shared = GrammarProcessor(vocab, grammar, sequences=2)
    shared.capacity = 3
    own = [GrammarProcessor(vocab, grammar) for _ in outputs]
    for k in range(max(map(len, outputs)) + 1):
        for ids, alone in zip(outputs, own):
            if k <= len(ids):
                assert allowed(shared, ids[:k], tok.vocab_size) == allowed(
                    alone, ids[:k], tok.vocab_size
                )
                assert k == len(ids) or ids[k] in allowed(alone, ids[:k], tok.vocab_size)
    assert allowed(own[0], outputs[0], tok.vocab_size) == [tok.eos_id]


def test_thinking_leaves_the_thought_free_but_for_eos(vocab, tok):
    grammar = vocab.compile(json_schema_grammar({"enum": ["yes", "no"]}))
    proc = GrammarProcessor(vocab, grammar, thinking=True)
    thought = tok.encode("hmm")
    free = allowed(proc, thought, tok.vocab_size)
    assert tok.eos_id not in free and len(free) == tok.vocab_size - 1
    table = TokenTable(tok)
    newline = table.bytes.index(b"\n")
    closed = [*thought, tok.special_ids["end_think"]]
    answer = allowed(proc, closed, tok.vocab_size)
    # the newline the chat template puts after the thought, or the answer itself
    assert newline in answer
    assert all(table.bytes[i] in (b"\n", b'"', b'"y', b'"n') for i in answer)
    after_newline = allowed(proc, [*closed, newline], tok.vocab_size)
    assert after_newline == [i for i in answer if i != newline]


SMALL = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": -5, "maximum": 5},
        "words": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["ok"],
    "additionalProperties": False,
}  # its longest document: 38 bytes and 16 gaps of up to WS_MAX whitespace, < 400 tokens


def test_speculative_decoding_keeps_the_grammar(tok, vocab):
    """With MTP drafts the engine asks about a draft's position too (and drafts that the mask
    refuses are rejected): shared processors, branching prefixes, sampled and greedy rows."""
    torch.manual_seed(5)
    config = tiny_config(
        vocab_size=tok.vocab_size, max_position_embeddings=1024, num_nextn_predict_layers=1
    )
    engine = Engine(Transformer(config).eval(), EngineTokenizer(tok), speculative=True)
    grammar = vocab.build("json_schema", SMALL)
    ids, _ = chat_prompt(tok, [{"role": "user", "content": "JSON"}], thinking=False)
    proc = GrammarProcessor(vocab, grammar)  # one for all, as the server shares it among n
    params = [
        SamplingParams(max_tokens=600, temperature=t, seed=seed, logits_processors=[proc])
        for t, seed in [(0.0, 0), *((1.0, s) for s in range(6))]
    ]
    outs = engine.generate([ids] * len(params), params)
    for out in outs:
        assert out.finish_reason == "stop" and out.token_ids[-1] == tok.eos_id
        jsonschema.validate(json.loads(out.text), SMALL)
    assert engine.stats()["spec_drafted"] > 0


# ----------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    """Random weights, a long context: a model that writes anything the grammar lets it."""
    path = build_random_checkpoint(tmp_path_factory.mktemp("schema") / "model", context=CONTEXT)
    with ServerProcess(path, "--max-tokens", str(CONTEXT - 100)) as s:
        yield s.wait_ready()


@pytest.fixture(scope="module")
def trained_server():
    with ServerProcess(shared_checkpoint(), "--max-tokens", "400") as s:
        yield s.wait_ready()


def client_of(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def json_schema(schema, name="pet", **kw):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, **kw}}


def test_fifty_samples_at_temperature_one_all_validate(random_server):
    r = client_of(random_server).chat.completions.create(
        model="nanoseek",
        messages=[{"role": "user", "content": "Describe a pet in JSON"}],
        temperature=1.0,
        seed=0,
        n=50,
        max_tokens=WORST_CASE_TOKENS + 50,
        response_format=json_schema(SCHEMA, strict=True),
        extra_body={"thinking": {"type": "disabled"}},
    )
    assert len(r.choices) == 50
    docs = []
    for c in r.choices:
        # the longest document fits in max_tokens, so every one ends with EOS
        assert c.finish_reason == "stop", c.message.content
        doc = json.loads(c.message.content)
        jsonschema.validate(doc, SCHEMA)
        docs.append(doc)
    # the samples are not all alike (the model's own choices, within the schema)
    assert len({json.dumps(d, sort_keys=True) for d in docs}) > 10
    assert any("tags" in d or "nickname" in d or "floor" in d["home"] for d in docs)


def test_out_of_tokens_gives_length_and_the_partial_text(random_server, vocab, tok):
    r = client_of(random_server).chat.completions.create(
        model="nanoseek",
        messages=[{"role": "user", "content": "JSON"}],
        temperature=1.0,
        seed=1,
        n=4,
        max_tokens=5,
        response_format=json_schema(SCHEMA),
        extra_body={"thinking": {"type": "disabled"}},
    )
    # the shortest document, {"name":"","kind":"cat","age":0,"home":{"city":""}}, needs more bytes
    # than 5 tokens of this vocabulary hold (the longest token has a handful)
    longest = max(len(b or b"") for b in TokenTable(tok).bytes)
    assert 5 * longest < len('{"name":"","kind":"cat","age":0,"home":{"city":""}}')
    grammar = vocab.compile(json_schema_grammar(SCHEMA))
    for c in r.choices:
        assert c.finish_reason == "length" and r.usage.completion_tokens == 4 * 5
        m = grammar.start.deep_copy()  # a prefix of a valid document, not a whole one
        assert m.consume_tokens(tok.encode(c.message.content)) and not m.is_accepting()


def test_streamed_schema_output_validates(random_server):
    stream = client_of(random_server).chat.completions.create(
        model="nanoseek",
        messages=[{"role": "user", "content": "JSON"}],
        temperature=1.0,
        seed=2,
        max_tokens=WORST_CASE_TOKENS + 50,
        response_format=json_schema(SCHEMA),
        stream=True,
        extra_body={"thinking": {"type": "disabled"}},
    )
    parts = []
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(parts)), SCHEMA)


class Verdict(pydantic.BaseModel):
    answer: str
    confidence: int


def test_the_clients_parse_helper_gets_its_model(random_server):
    """client.chat.completions.parse sends a pydantic model as a strict json_schema and parses
    the reply back into it."""
    r = client_of(random_server).chat.completions.parse(
        model="nanoseek",
        messages=[{"role": "user", "content": "Decide"}],
        temperature=1.0,
        seed=3,
        max_tokens=CONTEXT - 200,
        response_format=Verdict,
        extra_body={"thinking": {"type": "disabled"}},
    )
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length")  # an unbounded string may run to the end
    if c.finish_reason == "stop":
        assert isinstance(c.message.parsed, Verdict)


def test_thinking_comes_first_then_the_schema(trained_server):
    """The trained model thinks as it learned, then answers within the schema."""
    schema = {
        "type": "object",
        "properties": {"greeting": {"enum": ["hello", "hi"]}},
        "required": ["greeting"],
        "additionalProperties": False,
    }
    r = client_of(trained_server).chat.completions.create(
        model="nanoseek",
        messages=[{"role": "user", "content": HELLO}],
        temperature=0,
        max_tokens=300,
        response_format=json_schema(schema, name="greet"),
        extra_body={"thinking": {"type": "enabled"}},
    )
    c = r.choices[0]
    assert c.message.reasoning_content == HELLO_THOUGHT
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), schema)


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    "fields, param, words",
    [
        (
            {"response_format": json_schema({"type": "strin"})},
            "response_format.json_schema.schema",
            "Invalid type",
        ),
        (
            {"response_format": json_schema({"type": "string", "pattern": "[a-"})},
            "response_format.json_schema.schema",
            "regex",
        ),
        (
            {"response_format": json_schema({"$ref": "#/$defs/nowhere"})},
            "response_format.json_schema.schema",
            "nowhere",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "required",
        ),
        (
            {"response_format": json_schema({}, name="no spaces allowed")},
            "response_format.json_schema.name",
            "name",
        ),
        ({"response_format": json_schema([1])}, "response_format.json_schema.schema", ""),
        ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_choice": ["a", ""]}, "guided_choice", "non-empty"),
        ({"guided_json": "{not json"}, "guided_json", "JSON schema"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
        ({"structured_outputs": {"regex": "a{2,1}"}}, "structured_outputs.regex", ""),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
            "at most one",
        ),
        ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens", "min_tokens"),
    ],
)
def test_bad_structured_output_requests_get_400_naming_the_field(
    trained_server, fields, param, words
):
    r = post(trained_server, "/v1/chat/completions", {"messages": user("x"), **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    # the server stays up
    ok = post(trained_server, "/v1/chat/completions", {"messages": user(HELLO), "max_tokens": 2})
    assert ok.status_code == 200


def test_guided_choice_and_regex(random_server):
    client = client_of(random_server)
    choices = ["positive", "negative", "neutral 中性"]
    r = client.chat.completions.create(
        model="nanoseek",
        messages=user("Sentiment?"),
        temperature=1.0,
        seed=4,
        n=8,
        max_tokens=40,
        extra_body={"guided_choice": choices, "thinking": {"type": "disabled"}},
    )
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices)
    pattern = r"[a-c]{2,4}-[0-9]{1,3}"
    r = client.chat.completions.create(
        model="nanoseek",
        messages=user("Code?"),
        temperature=1.0,
        seed=5,
        n=8,
        max_tokens=40,
        extra_body={"guided_regex": pattern, "thinking": {"type": "disabled"}},
    )
    for c in r.choices:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.message.content), c


def test_completions_take_the_extras_too(random_server):
    client = client_of(random_server)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 3}
    r = client.completions.create(
        model="nanoseek",
        prompt=["Numbers:", "More numbers:"],
        temperature=1.0,
        seed=6,
        max_tokens=200,
        extra_body={"guided_json": schema},
    )
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)
    r = client.completions.create(
        model="nanoseek",
        prompt="Pick:",
        temperature=1.0,
        seed=7,
        n=4,
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": ["left", "right"]}},
    )
    assert {c.text for c in r.choices} <= {"left", "right"}
    r = client.completions.create(
        model="nanoseek",
        prompt="Pet:",
        temperature=1.0,
        seed=9,
        n=2,
        max_tokens=WORST_CASE_TOKENS + 50,
        extra_body={"response_format": json_schema(SCHEMA)},
    )
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)
    r = client.completions.create(
        model="nanoseek",
        prompt="Object:",
        temperature=1.0,
        seed=10,
        n=3,
        max_tokens=12,
        extra_body={"response_format": {"type": "json_object"}},
    )
    for c in r.choices:  # json_object mode closes within max_tokens
        assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict)
    grammar = 'start: "x" DIGIT DIGIT\nDIGIT: /[0-9]/'
    r = client.completions.create(
        model="nanoseek",
        prompt="Code:",
        temperature=1.0,
        seed=8,
        max_tokens=20,
        extra_body={"guided_grammar": grammar},
    )
    assert re.fullmatch(r"x[0-9]{2}", r.choices[0].text)
