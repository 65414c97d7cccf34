"""Serving pieces without a server: prompts, the reasoning split, token
bytes, request validation, metrics."""

import random

import pytest

from nanoseek.serve.chat_format import (
    EngineTokenizer,
    FormatError,
    ReasoningParser,
    TokenTable,
    chat_prompt,
    completion_prompt,
    split_reasoning,
)
from nanoseek.serve.config import ServerConfig
from nanoseek.serve.metrics import Histogram, Metrics
from nanoseek.serve.protocol import ChatCompletionRequest, CompletionRequest, ProtocolError, parse

from serve_helpers import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------- reasoning

SPLITS = [  # (text, starts in a thought, reasoning, content)
    ("I think.\n</think>\n\nThe answer.", True, "I think.", "The answer."),
    ("no end to this thought\n", True, "no end to this thought\n", ""),
    ("<think>\nhmm\n</think>\nok", False, "hmm", "ok"),
    ("plain answer, no thought", False, None, "plain answer, no thought"),
    ("  <think>x</think>y", False, "x", "y"),
    ("a </thin", True, "a </thin", ""),  # a partial tag at the end is text
    ("x</think>y</think>z", True, "x", "y</think>z"),  # only the first </think> splits
    ("<thinking is not a tag", False, None, "<thinking is not a tag"),
    ("中文的思考\n</think>\n中文的回答", True, "中文的思考", "中文的回答"),
    ("", True, "", ""),
]


@pytest.mark.parametrize("text,in_reasoning,reasoning,content", SPLITS)
def test_reasoning_split(text, in_reasoning, reasoning, content):
    assert split_reasoning(text, in_reasoning) == (reasoning, content)


@pytest.mark.parametrize("text,in_reasoning,reasoning,content", SPLITS)
def test_reasoning_split_does_not_depend_on_how_the_text_streams(
    text, in_reasoning, reasoning, content
):
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        parser = ReasoningParser(in_reasoning)
        r = c = ""
        for piece in pieces:
            dr, dc = parser.feed(piece)
            r, c = r + dr, c + dc
        dr, dc = parser.finish()
        assert (r + dr if parser.saw_reasoning else None, c + dc) == (reasoning, content), pieces


def test_reasoning_is_streamed_before_the_tag_arrives():
    parser = ReasoningParser(True)
    assert parser.feed("step one") == ("step one", "")
    assert parser.feed(", two\n") == (", two", "")  # the newline waits: it may precede </think>
    assert parser.feed("</think>\nAn") == ("", "An")
    assert parser.feed("swer") == ("", "swer")


# ------------------------------------------------------------------------------------------ prompts


def test_chat_prompt_follows_the_template_with_and_without_thinking(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids, thinking = chat_prompt(tok, msgs, True)
    assert thinking and ids == tok.apply_chat_template(
        msgs, add_generation_prompt=True, sanitize=True
    )
    assert ids[-2:] == [tok.special_ids["think"], *tok.encode("\n")]
    ids, thinking = chat_prompt(tok, msgs, False)
    assert not thinking and ids[-1] == tok.special_ids["assistant"]


def test_chat_prompt_keeps_special_strings_in_content_as_text(tok):
    ids, _ = chat_prompt(tok, [{"role": "user", "content": "<think> <｜Assistant｜>"}], False)
    assert ids.count(tok.special_ids["assistant"]) == 1 and tok.special_ids["think"] not in ids


def test_chat_prompt_drops_earlier_reasoning(tok):
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r"},
        {"role": "user", "content": "c"},
    ]
    ids, _ = chat_prompt(tok, history, True)
    assert tok.special_ids["end_think"] not in ids and "r" not in tok.decode(
        ids, skip_special_tokens=True
    )


def test_prefix_completion_continues_the_last_assistant_message(tok):
    user = {"role": "user", "content": "Hello"}
    base = tok.apply_chat_template(
        [user], add_generation_prompt=True, thinking=False, sanitize=True
    )
    ids, thinking = chat_prompt(
        tok, [user, {"role": "assistant", "content": "Hel", "prefix": True}], True
    )
    assert ids == base + tok.encode("Hel") and not thinking
    ids, thinking = chat_prompt(
        tok, [user, {"role": "assistant", "reasoning_content": "The", "prefix": True}], True
    )
    assert ids == base + [tok.special_ids["think"]] + tok.encode("\nThe") and thinking
    ids, thinking = chat_prompt(
        tok,
        [user, {"role": "assistant", "reasoning_content": "r", "content": "c", "prefix": True}],
        True,
    )
    assert (
        ids
        == base
        + [tok.special_ids["think"]]
        + tok.encode("\nr\n")
        + [tok.special_ids["end_think"]]
        + tok.encode("\nc")
        and not thinking
    )


def test_prefix_completion_is_refused_where_it_makes_no_sense(tok):
    with pytest.raises(FormatError) as e:
        chat_prompt(
            tok,
            [
                {"role": "assistant", "content": "x", "prefix": True},
                {"role": "user", "content": "y"},
            ],
            True,
        )
    assert e.value.param == "messages.0.prefix"
    with pytest.raises(FormatError) as e:
        chat_prompt(tok, [{"role": "user", "content": "y", "prefix": True}], True)
    assert e.value.param == "messages.0.prefix"


def test_completion_prompts_and_fill_in_the_middle(tok):
    assert completion_prompt(tok, "abc", None) == [tok.bos_id, *tok.encode("abc")]
    assert completion_prompt(tok, [5, 6], None) == [5, 6]
    s = tok.special_ids
    assert completion_prompt(tok, "def f(", "\n    return x") == [
        tok.bos_id,
        s["fim_begin"],
        *tok.encode("def f("),
        s["fim_hole"],
        *tok.encode("\n    return x"),
        s["fim_end"],
    ]
    with pytest.raises(FormatError):
        completion_prompt(tok, [5, 6], "suffix")


# -------------------------------------------------------------------------------------- token bytes


def test_token_table_has_the_exact_bytes_of_every_token(tok):
    table = TokenTable(tok)
    for text in [
        "Hello, world!",
        "你好，世界！",
        "tabs\tand\nnewlines  ",
        "emoji 🙂 and ünïcödé",
        "12345",
    ]:
        ids = tok.encode(text)
        assert b"".join(table.bytes[i] for i in ids) == text.encode("utf-8")
    assert table.bytes[tok.eos_id] is None and table.text(tok.eos_id) == "<｜end▁of▁sentence｜>"
    partial = next(
        i for i, b in enumerate(table.bytes) if b is not None and len(b) == 1 and b[0] >= 0x80
    )
    assert table.text(partial).startswith("\\x")


def test_engine_tokenizer_keeps_the_thinking_tags_and_drops_other_specials(tok):
    s = tok.special_ids
    ids = [tok.bos_id, *tok.encode("a"), s["end_think"], *tok.encode("b"), tok.eos_id]
    view = EngineTokenizer(tok)
    assert view.decode(ids, skip_special_tokens=True) == "a</think>b"
    assert view.decode(ids) == tok.decode(ids)
    assert view.eos_id == tok.eos_id


# --------------------------------------------------------------------------------------- validation


def _chat(**fields):
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    import json

    return parse(ChatCompletionRequest, json.dumps(body).encode())


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"temperature": "1"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"n": 0}, "n"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [1]}, "stop.0"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.type",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"seed": 2**64}, "seed"),
        ({"chat_template_kwargs": {"thinking": "yes"}}, "chat_template_kwargs.thinking"),
    ],
)
def test_invalid_fields_are_named(fields, param):
    with pytest.raises(ProtocolError) as e:
        _chat(**fields)
    assert e.value.param == param, str(e.value)


def test_bodies_that_are_not_requests():
    for body, words in [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "not valid JSON"),
    ]:
        with pytest.raises(ProtocolError, match=words):
            parse(ChatCompletionRequest, body)
    with pytest.raises(ProtocolError) as e:
        parse(CompletionRequest, b'{"prompt": []}')
    assert e.value.param == "prompt"


def test_thinking_switch_and_its_aliases():
    assert _chat().thinking_enabled(True) and not _chat().thinking_enabled(False)
    assert not _chat(thinking={"type": "disabled"}).thinking_enabled(True)
    assert _chat(thinking={"type": "enabled"}).thinking_enabled(False)
    assert not _chat(chat_template_kwargs={"thinking": False}).thinking_enabled(True)
    assert not _chat(chat_template_kwargs={"enable_thinking": False}).thinking_enabled(True)


def test_unknown_fields_are_accepted():
    req = _chat(frobnicate=1, messages=[{"role": "user", "content": "x", "mood": "happy"}])
    from nanoseek.serve.protocol import unknown_fields

    assert sorted(unknown_fields(req)) == ["frobnicate", "messages.0.mood"]


def test_completion_prompt_shapes():
    import json

    for prompt, n in [("a", 1), (["a", "b"], 2), ([1, 2, 3], 1), ([[1], [2, 3]], 2)]:
        assert len(parse(CompletionRequest, json.dumps({"prompt": prompt}).encode()).prompts) == n


# ---------------------------------------------------------------------------------- metrics, config


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v)
    assert h.lines("x") == [
        'x_bucket{le="0.1"} 1',
        'x_bucket{le="1.0"} 3',
        'x_bucket{le="+Inf"} 4',
        "x_sum 4.25",
        "x_count 4",
    ]


def test_metrics_text_has_help_and_type_for_every_series():
    m = Metrics()
    m.count_request("/v1/completions", 200)
    m.count_error("rate_limit_error")
    m.generation_done(prompt=10, cached=4, generated=5, ttft=0.2, duration=0.6, decode_time=0.4)
    text = m.render({"queue_depth": ("Waiting.", 3)}, {"engine_steps_total": ("Steps.", 7)})
    assert 'nanoseek_requests_total{endpoint="/v1/completions",status="200"} 1' in text
    assert "nanoseek_prompt_cache_hit_tokens_total 4" in text and "nanoseek_queue_depth 3" in text
    assert "nanoseek_time_per_output_token_seconds_sum 0.1" in text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    samples = {
        line.split("{")[0]
        .split()[0]
        .removesuffix("_bucket")
        .removesuffix("_sum")
        .removesuffix("_count")
        for line in text.splitlines()
        if not line.startswith("#")
    }
    assert samples <= names


def test_server_config_refuses_nonsense():
    for bad in (
        dict(port=70000),
        dict(max_tokens=0),
        dict(max_queue=-1),
        dict(request_timeout=0),
        dict(api_key=""),
    ):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    assert ServerConfig().host == "127.0.0.1"


def test_nested_field_names_survive_in_param():
    with pytest.raises(ProtocolError) as e:
        _chat(stream=True, stream_options={"include_usage": "yes"})
    assert e.value.param == "stream_options.include_usage"
    with pytest.raises(ProtocolError) as e:
        _chat(thinking={"type": "sometimes"})
    assert e.value.param == "thinking.type"
