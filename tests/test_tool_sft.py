"""The SFT's tool-use conversations (data/conversations.py tool_conversations): a calculator the
conversation declares as the chat template declares tools, called for train-split arithmetic and
word problems, its results computed by Python; each conversation is the server's prompt for that
turn plus the reply, so the model learns the exact format the server parses. Also the chat data's
new fields (tool calls, tool messages, weight 0) and their checks."""

from __future__ import annotations

import json

import pytest

from nanoseek.data import conversations as conv_module
from nanoseek.data.chat_tokens import (
    ChatDataError,
    read_chat_jsonl,
    tokenize_conversation,
    tokenize_conversations,
    validate_messages,
)
from nanoseek.data.conversations import CALCULATOR, calculate, tool_conversations
from nanoseek.serve.chat_format import EngineTokenizer, ReasoningParser, chat_prompt, chat_turn
from nanoseek.serve.tools import ToolParser
from nanoseek.tasks.arithmetic import Arithmetic
from nanoseek.tasks.base import split_of
from nanoseek.train.sft import sft_mix, split_section

from serve_helpers import build_tokenizer

TASKS = {"arithmetic": [1, 2], "word_problems": [1], "countdown": [1]}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def convs():
    return tool_conversations(TASKS, 60, seed=3)


def test_the_calculator_is_python_on_integers_only():
    assert calculate("2 * (3 + 4) - 10 // 3 % 2") == 2 * (3 + 4) - 10 // 3 % 2
    assert calculate("-7 * -8") == 56 and calculate("123456789 * 987654321") == 121932631112635269
    for bad in ("2 ** 3", "1.5 + 1", "abs(-1)", "x + 1", "1 / 2", "", "__import__('os')"):
        with pytest.raises(ValueError):
            calculate(bad)


def kinds(convs):
    """(calls, answers, greetings): conversations whose trained reply calls the tool, answers from
    its result, or greets with the tool declared."""
    calls = [c for c in convs if c[-1].get("tool_calls")]
    answers = [c for c in convs if c[-2]["role"] == "tool"]
    greetings = [c for c in convs if c not in calls and c not in answers]
    return calls, answers, greetings


def test_the_mix_of_calls_answers_and_greetings(convs):
    calls, answers, greetings = kinds(convs)
    assert len(calls) == len(answers) and len(greetings) == 60 // 5 and len(convs) >= 60
    langs = {
        "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in c[1]["content"]) else "en" for c in calls
    }
    assert langs == {"en", "zh"}
    for c in convs:  # every one declares the calculator, first, as the template declares tools
        assert c[0]["role"] == "system" and json.dumps(CALCULATOR["function"]) in c[0]["content"]
    # word problems too, not only bare arithmetic
    words = [c for c in calls if not c[1]["content"].startswith(("What is", "计算"))]
    assert words and len(words) < len(calls)


def test_tool_results_are_pythons_and_answers_use_the_task_format(convs):
    _, answers, _ = kinds(convs)
    for c in answers:
        _, user, call_turn, tool, reply = c
        assert call_turn.get("weight") == 0  # history, as a client sends it back
        [call] = call_turn["tool_calls"]
        expression = json.loads(call["function"]["arguments"])["expression"]
        assert tool["tool_call_id"] == call["id"] and tool["content"] == str(calculate(expression))
        assert reply["content"] == f"<answer>{calculate(expression)}</answer>"


def test_only_train_split_problems(convs, monkeypatch):
    calls, _, _ = kinds(convs)
    arithmetic = Arithmetic()
    for c in calls:  # an arithmetic expression is its problem's key: check its split directly
        expression = json.loads(c[-1]["tool_calls"][0]["function"]["arguments"])["expression"]
        if c[1]["content"].startswith(("What is", "计算")):
            a, op, b = expression.split(" ")
            assert split_of("arithmetic", f"{a}{op}{b}", arithmetic.test_fraction) == "train"
    splits = []
    real = conv_module.task_problems

    def spy(*args, **kw):
        splits.append(kw.get("split", "train"))
        return real(*args, **kw)

    monkeypatch.setattr(conv_module, "task_problems", spy)
    tool_conversations(TASKS, 20, seed=3)
    assert splits == ["train"]


def test_each_conversation_is_the_servers_prompt_plus_the_reply(convs, tok):
    """The ids SFT trains on: the prompt the server builds for that turn (its own chat_turn and the
    same template with the tools; special-token strings in the task's instructions aside, which the
    server treats as plain text), then the trained reply, then nothing."""
    tools = [CALCULATOR]
    for c in convs:
        ids, trainable = tokenize_conversation(tok, c)
        served = [chat_turn(m) for m in c[1:-1]]  # what a client sends: the history
        prompt = tok.apply_chat_template(served, add_generation_prompt=True, tools=tools)
        assert ids[: len(prompt)] == prompt
        assert not any(trainable[: len(prompt)]) and all(trainable[len(prompt) :])
        assert tok.decode(ids) == tok.apply_chat_template(c, tokenize=False)
        if "<" not in c[1]["content"]:  # a greeting: the server's own prompt, exactly
            assert chat_prompt(tok, served, True, tools)[0] == prompt


def test_a_trained_call_parses_back_into_the_call(convs, tok):
    """The trained span of a calling conversation, decoded as the engine streams it, goes through
    the server's parsers: a thought, then one calculator call whose expression gives the answer."""
    calls, _, _ = kinds(convs)
    engine_tok = EngineTokenizer(tok)
    for c in calls[:10]:
        ids, trainable = tokenize_conversation(tok, c)
        span = [i for i, t in zip(ids, trainable) if t][:-1]  # the EOS ends generation
        text = engine_tok.decode(span, skip_special_tokens=True)
        reasoning = ReasoningParser(True)
        parser = ToolParser("raw")
        r1, content = reasoning.feed(text)
        r2, tail = reasoning.finish()
        assert r1 + r2 == c[-1]["reasoning_content"]
        shown = parser.feed(content + tail)[0] + parser.finish()[0]
        assert shown == "" and [(x.name, x.arguments) for x in parser.calls] == [
            ("calculator", c[-1]["tool_calls"][0]["function"]["arguments"])
        ]


def test_sft_mix_has_the_share_asked_for():
    data, _ = split_section(
        {"problems_per_task": 40, "identity": 20, "corpus_qa": 0, "tasks": TASKS}
    )
    mix = sft_mix(data)
    with_tools = [c for c in mix if c[0]["role"] == "system"]
    assert abs(len(with_tools) / len(mix) - data["tool_use"]) < 0.02
    assert data["tool_use"] == 0.15
    none, _ = split_section({"problems_per_task": 40, "tasks": TASKS, "tool_use": 0})
    assert not any(c[0]["role"] == "system" for c in sft_mix(none))
    bad, _ = split_section({"tool_use": 1.0})
    with pytest.raises(ValueError, match="tool_use"):
        sft_mix(bad)
    # the whole mix tokenizes in one batch, as SFT does
    tok = build_tokenizer()
    assert len(tokenize_conversations(tok, mix)) == len(mix)


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    "messages, words",
    [
        (
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "c1", "content": "1"},
                {"role": "assistant", "content": "y"},
            ],
            "must alternate",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "assistant", "content": "y"},
            ],
            "must alternate",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c2", "content": "1"},
            ],
            "answers no open call",
        ),
        ([{"role": "user", "content": "x", "weight": 0}], "weight"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}],
            "weight",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{no"}}],
                },
            ],
            "not JSON",
        ),
        ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "only assistant"),
    ],
)
def test_bad_tool_conversations_say_what_is_wrong(messages, words):
    with pytest.raises(ChatDataError, match=words):
        validate_messages(messages)


def test_a_jsonl_file_may_carry_tools_as_openais_fine_tuning_files_do(tmp_path, tok):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "assistant", "content": "4"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": tools}) + "\n", "utf-8")
    [conversation] = read_chat_jsonl(path)
    ids, trainable = tokenize_conversation(tok, conversation)
    assert ids == tok.apply_chat_template(messages, tools=tools)
    # both assistant turns are trained (no weight 0 here): the call and the answer
    trained = tok.decode([i for i, t in zip(ids, trainable) if t])
    assert trained == (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
        "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>4<｜end▁of▁sentence｜>"
    )
