"""A checkpoint's own chat template: DeepSeek-V3's and V3.1's released templates (tests/data/), and
nanoseek's own template with tools, render through nanoseek (no transformers in nanoseek's code)
byte for byte as transformers renders them; a tokenizer without nanoseek's special tokens loads when
it brings a template; the tool-call parser against the formats these templates write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanoseek import chat_template
from nanoseek.serve.chat_format import FormatError, chat_prompt, completion_prompt, tool_format
from nanoseek.serve.tools import ToolParser, generation_prefix
from nanoseek.tokenizer import TokenizerError, load_tokenizer

from helpers import foreign_tokenizer
from serve_helpers import build_tokenizer

transformers = pytest.importorskip("transformers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

DATA = Path(__file__).parent / "data"
TEMPLATES = {
    "v3": (DATA / "deepseek-v3.chat_template.jinja").read_text("utf-8"),
    "v3.1": (DATA / "deepseek-v3.1.chat_template.jinja").read_text("utf-8"),
}


def call(i: int, name: str, arguments: str) -> dict:
    return {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


WEATHER = '{"city": "Paris", "days": 3}'
SUM = '{"numbers": [1, 2, 3.5]}'
# conversations whose messages have no None values: transformers' apply_chat_template takes them
PLAIN = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "再见 <think> <｜tool▁sep｜>"},
    ],
    [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call(1, "weather", WEATHER)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
]
# assistant tool-call turns with content None (DeepSeek-V3's template renders calls only then;
# transformers' apply_chat_template drops None fields, so these go through its renderer directly)
TOOL_HISTORY = [
    [
        {"role": "system", "content": "You may call functions."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call(1, "weather", WEATHER)]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
        {"role": "assistant", "content": "Sunny for three days."},
        {"role": "user", "content": "And the sum?"},
    ],
    [
        {"role": "user", "content": "Two things"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call(1, "weather", WEATHER), call(2, "add", SUM)],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": "6.5"},
    ],
]


def checkpoint_tokenizer(tmp_path: Path, template: str | None):
    """nanoseek's test tokenizer (DeepSeek's special tokens) saved with another chat template."""
    d = tmp_path / "tok"
    build_tokenizer().save(d)
    config_file = d / "tokenizer_config.json"
    config = json.loads(config_file.read_text("utf-8"))
    if template is not None:
        config["chat_template"] = template
    config_file.write_text(json.dumps(config, ensure_ascii=False), "utf-8")
    return d


@pytest.mark.parametrize("name", ["v3", "v3.1"])
def test_deepseek_templates_match_transformers(tmp_path, name):
    d = checkpoint_tokenizer(tmp_path, TEMPLATES[name])
    ours = load_tokenizer(d)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert ours.chat_template == TEMPLATES[name] == hf.chat_template
    variants = [dict(add_generation_prompt=g) for g in (False, True)]
    if name == "v3.1":
        variants = [
            dict(add_generation_prompt=g, thinking=t) for g in (False, True) for t in (0, 1)
        ]
        variants = [{**v, "thinking": bool(v["thinking"])} for v in variants]
    for messages in PLAIN:
        for kw in variants:
            text = ours.apply_chat_template(messages, tokenize=False, **kw)
            assert text == hf.apply_chat_template(messages, tokenize=False, **kw)
            ids = ours.apply_chat_template(messages, **kw)
            assert ids == hf.apply_chat_template(messages, return_dict=False, **kw)
            safe = ours.apply_chat_template(messages, sanitize=True, **kw)
            assert safe == hf.apply_chat_template(
                messages, return_dict=False, sanitize_control_tokens=True, **kw
            )
    for messages in TOOL_HISTORY:
        for kw in variants:
            text = ours.apply_chat_template(messages, tokenize=False, **kw)
            (rendered,), _ = render_jinja_template(
                [messages], chat_template=TEMPLATES[name], **hf.special_tokens_map, **kw
            )
            assert text == rendered
            assert "<｜tool▁call▁begin｜>" in text and "<｜tool▁output▁begin｜>" in text
            ids = ours.apply_chat_template(messages, **kw)
            assert ids == hf(rendered, add_special_tokens=False)["input_ids"]


def test_deepseek_template_shapes(tmp_path):
    """What each format looks like (and V3's single-call history left unclosed, as released)."""
    v3 = load_tokenizer(checkpoint_tokenizer(tmp_path / "a", TEMPLATES["v3"]))
    v31 = load_tokenizer(checkpoint_tokenizer(tmp_path / "b", TEMPLATES["v3.1"]))
    first = TOOL_HISTORY[0][:4]
    text = v3.apply_chat_template(first, tokenize=False)
    assert (
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>weather\n```json\n" + WEATHER + "\n```" in text
    )
    assert "<｜tool▁calls▁end｜>" not in text  # the released V3 template's bug (spec part E.4)
    text = v31.apply_chat_template(first, tokenize=False)
    assert "<｜tool▁call▁begin｜>weather<｜tool▁sep｜>" + WEATHER + "<｜tool▁call▁end｜>" in text
    assert chat_template.tool_format(TEMPLATES["v3"]) == "fenced" == tool_format(v3)
    assert chat_template.tool_format(TEMPLATES["v3.1"]) == "raw" == tool_format(v31)
    assert not chat_template.reads_tools(TEMPLATES["v3"])
    assert chat_template.reads_thinking(TEMPLATES["v3.1"])
    assert not chat_template.reads_thinking(TEMPLATES["v3"])


def test_server_prompt_declares_tools_for_templates_that_ignore_them(tmp_path):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    tok = load_tokenizer(checkpoint_tokenizer(tmp_path, TEMPLATES["v3.1"]))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    ids, in_reasoning = chat_prompt(tok, msgs, thinking=True, tools=tools)
    text = tok.decode(ids)
    assert text.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\n")
    assert '{"name": "weather", "parameters": {}}' in text
    assert text.endswith("<｜User｜>Weather?<｜Assistant｜><think>") and in_reasoning
    ids, in_reasoning = chat_prompt(tok, msgs, thinking=False, tools=tools)
    assert tok.decode(ids).endswith("<｜Assistant｜></think>") and not in_reasoning
    # nanoseek's own template declares them itself, in the same words
    own = build_tokenizer()
    ids, _ = chat_prompt(own, msgs, thinking=False, tools=tools)
    assert own.decode(ids).startswith(text.split("<｜User｜>")[0])


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather <think> forecast",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "add"}},
]


@pytest.mark.parametrize("messages", PLAIN + TOOL_HISTORY)
def test_own_template_with_tools_matches_transformers(tmp_path, messages):
    tok = build_tokenizer()
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # transformers drops None fields; nanoseek renders a None content as ""
    hf_messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    for tools in (None, TOOLS):
        for gen in (False, True):
            kw = dict(add_generation_prompt=gen, thinking=gen)
            text = tok.apply_chat_template(messages, tokenize=False, tools=tools, **kw)
            assert text == hf.apply_chat_template(hf_messages, tokenize=False, tools=tools, **kw)
            ids = tok.apply_chat_template(messages, tools=tools, **kw)
            assert ids == hf.apply_chat_template(hf_messages, return_dict=False, tools=tools, **kw)
            safe = tok.apply_chat_template(messages, sanitize=True, tools=tools, **kw)
            assert safe == hf.apply_chat_template(
                hf_messages, return_dict=False, sanitize_control_tokens=True, tools=tools, **kw
            )


def test_tokenizer_without_nanoseek_tokens_loads_with_its_template(tmp_path):
    d = foreign_tokenizer(tmp_path)
    tok = load_tokenizer(d)
    assert tok.bos_id == 0 and tok.eos_id == 1 and "user" not in tok.special_ids
    hf = transformers.AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "hello <|im_end|> world"}]
    for kw in (dict(add_generation_prompt=True), dict(add_generation_prompt=False)):
        assert tok.apply_chat_template(msgs, tokenize=False, **kw) == hf.apply_chat_template(
            msgs, tokenize=False, **kw
        )
        assert tok.apply_chat_template(msgs, sanitize=True, **kw) == hf.apply_chat_template(
            msgs, return_dict=False, sanitize_control_tokens=True, **kw
        )
    assert tool_format(tok) is None  # no tool tokens: tools are refused (400) by the server
    ids, in_reasoning = chat_prompt(tok, msgs, thinking=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and not in_reasoning
    with pytest.raises(FormatError, match="fim_begin") as err:
        completion_prompt(tok, "def f(", ")")
    assert err.value.param == "suffix"
    # without a template, nanoseek's own tokens are needed (and missing)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}), "utf-8")
    with pytest.raises(TokenizerError, match="<｜User｜>"):
        load_tokenizer(d)


def test_template_errors_are_clear(tmp_path):
    d = foreign_tokenizer(tmp_path)
    config = json.loads((d / "tokenizer_config.json").read_text("utf-8"))
    config["chat_template"] = "{% if %}"
    (d / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    with pytest.raises(TokenizerError, match="does not compile"):
        load_tokenizer(d)
    config["chat_template"] = "{{ raise_exception('no system role') }}"
    (d / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    tok = load_tokenizer(d)
    with pytest.raises(FormatError, match="no system role"):
        chat_prompt(tok, [{"role": "user", "content": "x"}], thinking=False)
    # the sandbox: no way out through attributes
    config["chat_template"] = "{{ messages.__class__.__mro__ }}"
    (d / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    with pytest.raises(FormatError):
        chat_prompt(load_tokenizer(d), [{"role": "user", "content": "x"}], thinking=False)


# ------------------------------------------------------------------------------- the call parser

RAW = (
    "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>weather<｜tool▁sep｜>"
    + WEATHER
    + "<｜tool▁call▁end｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>"
    + SUM
    + "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
)
FENCED = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>weather\n```json\n"
    + WEATHER
    + "\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n"
    + SUM
    + "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
)


def parse_in_pieces(fmt, text, size, prefix=""):
    parser = ToolParser(fmt, prefix)
    content = ""
    streamed: dict[int, dict] = {}
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    for out in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content += out[0]
        for d in out[1]:
            if d.id is not None:
                assert d.index == len(streamed) and d.arguments == ""
                streamed[d.index] = {"id": d.id, "name": d.name, "arguments": ""}
            else:
                streamed[d.index]["arguments"] += d.arguments
    calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in parser.calls]
    assert [streamed[i] for i in range(len(streamed))] == calls  # stream == whole
    return content, [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize("fmt,text", [("raw", RAW), ("fenced", FENCED)])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_parser_is_chunking_invariant(fmt, text, size):
    content, calls = parse_in_pieces(fmt, text, size)
    assert calls == [("weather", WEATHER), ("add", SUM)]
    assert content == ("Let me look." if fmt == "raw" else "")


def test_parser_edges():
    # arguments that end in a number or an array keep their tail (vLLM's streaming can lose it)
    text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>[1, 22]<｜tool▁call▁end｜>"
    assert parse_in_pieces("raw", text, 1)[1] == [("f", "[1, 22]")]
    # cut off by max_tokens inside the arguments: the call keeps what was written
    cut = text.removesuffix("2]<｜tool▁call▁end｜>")
    assert parse_in_pieces("raw", cut, 1)[1] == [("f", "[1, 2")]
    # no tools: tool markers never reach the content; text that only looks like one stays
    assert parse_in_pieces(None, "a<｜tool▁sep｜>b<｜tool x", 1) == ("ab<｜tool x", [])
    # text after the block is dropped
    assert parse_in_pieces("raw", RAW + "trailing", 4)[0] == "Let me look."
    # a forced (named) call: the prefix is parsed, the model continues with the arguments
    prefix = generation_prefix("raw", "weather")
    assert prefix == "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>weather<｜tool▁sep｜>"
    rest = WEATHER + "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    assert parse_in_pieces("raw", rest, 3, prefix) == ("", [("weather", WEATHER)])
    assert generation_prefix("fenced", "required") == "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
    assert generation_prefix("fenced", "weather").endswith("weather\n```json\n")
    assert generation_prefix("raw", "auto") == generation_prefix("raw", "none") == ""


@pytest.mark.parametrize("name", ["v3", "v3.1"])
def test_forced_prefix_continues_the_prompt_as_the_template_writes_calls(tmp_path, name):
    """The server's prompt for a forced call (generation prompt without a thought + the prefix) is
    the start of how the checkpoint's own template renders that call in history."""
    tok = load_tokenizer(checkpoint_tokenizer(tmp_path, TEMPLATES[name]))
    fmt = tool_format(tok)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    ids, in_reasoning = chat_prompt(tok, ask, thinking=False)
    prompt = tok.decode(ids) + generation_prefix(fmt, "weather")
    history = tok.apply_chat_template(
        [*ask, {"role": "assistant", "content": None, "tool_calls": [call(1, "weather", WEATHER)]}],
        tokenize=False,
        thinking=False,
    )
    assert history.startswith(prompt) and not in_reasoning
    assert history[len(prompt) :].startswith(WEATHER)
    whole, calls = parse_in_pieces(
        fmt, history[len(prompt) :], 5, generation_prefix(fmt, "weather")
    )
    assert calls == [("weather", WEATHER)]
