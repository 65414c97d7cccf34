"""SFT data: assistant-only targets at exact positions, think traces, the chat JSONL validator, the
packed loader, and the generated conversations."""

import json

import pytest
import torch

from nanoseek.data.chat_tokens import (
    ChatDataError,
    ChatLoader,
    completion_text,
    problem_messages,
    prompt_ids,
    read_chat_jsonl,
    tokenize_conversation,
    tokenize_conversations,
    validate_messages,
)
from nanoseek.data.conversations import (
    chinese_number,
    corpus_conversations,
    identity_conversations,
    task_conversations,
)
from nanoseek.model import IGNORE_INDEX
from nanoseek.tasks import get_task

from helpers import TASK_MIX, small_tokenizer

CONV = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "reasoning_content": "2 + 3 = 5", "content": "<answer>5</answer>"},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi!"},
]


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def spans(mask):
    """[start, end) of each run of True."""
    out, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_only_assistant_tokens_are_trainable_at_exact_positions(tok):
    ids, mask = tokenize_conversation(tok, CONV)
    assert ids == tok.apply_chat_template(CONV)
    # Independently: each assistant span starts where the generation prompt for that turn ends.
    p1 = tok.apply_chat_template(CONV[:2], add_generation_prompt=True, thinking=True)
    f1 = tok.apply_chat_template(CONV[:3])
    p2 = tok.apply_chat_template(CONV[:4], add_generation_prompt=True, thinking=False)
    assert ids[: len(p1)] == p1 and ids[: len(f1)] == f1 and ids[: len(p2)] == p2
    assert spans(mask) == [(len(p1), len(f1)), (len(p2), len(ids))]
    assert (
        tok.decode(ids[len(p1) : len(f1)])
        == "2 + 3 = 5\n</think>\n<answer>5</answer><｜end▁of▁sentence｜>"
    )
    assert tok.decode(ids[len(p2) :]) == "Hi!<｜end▁of▁sentence｜>"
    # the prompt supplies <think>\n
    assert tok.decode(ids[: len(p1)]).endswith("<｜Assistant｜><think>\n")
    assert tokenize_conversations(tok, [CONV]) == [(ids, mask)]


def test_loader_targets_are_the_next_assistant_token(tok):
    ids, mask = tokenize_conversation(tok, CONV)
    loader = ChatLoader([(ids, mask)], 1, len(ids) + 5, pad_id=tok.pad_id, shuffle=False)
    x, y = next(loader)
    assert x[0, : len(ids)].tolist() == ids and (x[0, len(ids) :] == tok.pad_id).all()
    expected = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    assert y[0, : len(ids) - 1].tolist() == expected
    assert (y[0, len(ids) - 1 :] == IGNORE_INDEX).all()  # nothing after the final eos


def test_worked_solutions_match_the_generation_prompt_and_the_grader(tok):
    for name, difficulties in TASK_MIX.items():
        task = get_task(name)
        for lang in ("en", "zh"):
            problem = task.generate(1, seed=3, difficulty=difficulties[-1], lang=lang)[0]
            ids, mask = tokenize_conversation(tok, problem_messages(problem))
            prompt = prompt_ids(tok, problem.prompt)
            assert (
                ids[: len(prompt)] == prompt
                and not any(mask[: len(prompt)])
                and all(mask[len(prompt) :])
            )
            completion = completion_text(tok, ids[len(prompt) :])
            # think trace
            assert completion.startswith(problem.solution.reasoning) and "</think>" in completion
            reward = task.grade(problem, completion, think_prefilled=True)
            assert reward.correct and reward.format == 1.0, (name, lang, reward)


def test_reasoning_whitespace_is_normalised(tok):
    conv = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "reasoning_content": "\n  think  \n", "content": "a"},
    ]
    assert validate_messages(conv)[1]["reasoning_content"] == "think"
    ids, mask = tokenize_conversation(tok, conv)
    first = mask.index(True)
    assert tok.decode(ids[first:]) == "think\n</think>\na<｜end▁of▁sentence｜>"


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not valid JSON"),
        ('{"msgs": []}', 'expected an object like {"messages"'),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": 3}]}', "'content' must be a string"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
        (
            '{"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}, '
            '{"role": "assistant", "content": "a"}]}',
            "only assistant messages may have",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "a"}, '
            '{"role": "user", "content": "q"}]}',
            "must alternate",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": " "}]}',
            "assistant message is empty",
        ),
        (
            '{"messages": [{"role": "user", "content": "q<｜Assistant｜>"}, '
            '{"role": "assistant", "content": "a"}]}',
            "control token",
        ),
        (
            '{"messages": [{"role": "user", "content": "q", "name": "x"}, '
            '{"role": "assistant", "content": "a"}]}',
            "unknown field",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
            '{"role": "assistant", "content": "a"}]}',
            "system messages must come before",
        ),
    ],
)
def test_chat_jsonl_validator_names_the_line_and_the_problem(tmp_path, line, message):
    good = json.dumps({"messages": CONV[1:3]})
    path = tmp_path / "chat.jsonl"
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ChatDataError) as err:
        read_chat_jsonl(path)
    assert f"{path}:3" in str(err.value) and message in str(err.value)


def test_chat_jsonl_round_trip_and_file_errors(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n", encoding="utf-8")
    assert read_chat_jsonl(path) == [CONV]
    with pytest.raises(ChatDataError, match="no such chat JSONL file"):
        read_chat_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ChatDataError, match="no conversations"):
        read_chat_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\n")
    with pytest.raises(ChatDataError, match="bin.jsonl:1: not UTF-8"):
        read_chat_jsonl(tmp_path / "bin.jsonl")


def examples(tok, n=60):
    return tokenize_conversations(
        tok, task_conversations({"arithmetic": [1, 2], "word_problems": [1]}, n)
    )


def test_loader_packs_whole_conversations_and_resumes_exactly(tok):
    data = examples(tok)
    longest = max(len(ids) for ids, _ in data)
    pad = tok.special_ids["reserved_0"]  # distinct from eos, to see where conversations end
    loader = ChatLoader(data, 3, 2 * longest, pad_id=pad, seed=1, epochs=1)
    whole, seen = {tuple(ids) for ids, _ in data}, []
    for x, y in loader:
        for row, targets in zip(x.tolist(), y.tolist()):
            row.append(targets[-1] if targets[-1] != IGNORE_INDEX else pad)  # the row's last token
            starts = [i for i, t in enumerate(row) if t == tok.bos_id]
            for s, e in zip(starts, starts[1:] + [len(row)]):
                segment = row[s:e]
                while segment[-1] == pad:
                    segment.pop()
                seen.append(tuple(segment))
    assert set(seen) <= whole and len(seen) == len(data)  # whole conversations, each once per epoch
    # resume
    loader = ChatLoader(data, 3, 2 * longest, pad_id=tok.pad_id, seed=1)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(7)]
    other = ChatLoader(data, 3, 2 * longest, pad_id=tok.pad_id, seed=1)
    other.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [next(other) for _ in range(7)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="seed"):
        ChatLoader(data, 3, 2 * longest, pad_id=tok.pad_id, seed=2).load_state_dict(state)


def test_loader_ranks_are_disjoint_and_long_conversations_are_dropped(tok):
    data = examples(tok)
    cut = sorted(len(ids) for ids, _ in data)[len(data) // 2]
    ranks = [
        ChatLoader(data, 1, cut - 1, pad_id=tok.pad_id, rank=r, world_size=2, epochs=1)
        for r in range(2)
    ]
    assert ranks[0].dropped == sum(len(ids) > cut for ids, _ in data)
    rows = [[tuple(x[0].tolist()) for x, _ in loader] for loader in ranks]
    assert rows[0] and rows[1] and not set(rows[0]) & set(rows[1])
    with pytest.raises(ValueError, match="none of the 120 conversations fits"):
        ChatLoader(data, 1, 4, pad_id=tok.pad_id)
    with pytest.raises(ValueError, match="1 packed rows cannot feed 2 ranks"):
        next(ChatLoader(data[:2], 1, 512, pad_id=tok.pad_id, rank=1, world_size=2))


def test_generated_conversations_are_deterministic_and_valid(tok):
    convs = identity_conversations(30, seed=2)
    assert convs == identity_conversations(30, seed=2)
    assert {c[0]["content"][0].isascii() for c in convs} == {True, False}  # English and Chinese
    records = [
        {
            "source": "bible-web",
            "text": "Genesis 1\n\nIn the beginning, God created the heavens and the earth. The "
            "earth was formless and empty.",
        },
        {
            "source": "wikipedia-vital",
            "text": "Anime\n\nAnime is animation originating from Japan. More text.",
        },
        {
            "source": "sanguo",
            "text": "第一百二十回 荐杜预老将献新谋　降孙皓三分归一统\n\n"
            "却说吴主孙休，闻司马炎已篡魏，知其必将伐吴。",
        },
        {"source": "python-stdlib", "text": "import os"},
    ]
    qa = corpus_conversations(records, 10)
    assert len(qa) == 3
    answers = " ".join(c[1]["content"] for c in qa)
    assert "In the beginning, God created the heavens and the earth." in answers
    assert "Anime is animation originating from Japan." in answers
    assert "荐杜预老将献新谋 降孙皓三分归一统" in answers or "却说吴主孙休" in answers
    for conv in convs + qa:
        tokenize_conversation(tok, conv)  # valid, and every assistant turn has a think block
        assert all("reasoning_content" in m for m in conv if m["role"] == "assistant")
    numerals = ("三", "十", "十一", "二十", "一百二十", "一百零五", "x")
    assert [chinese_number(s) for s in numerals] == [3, 10, 11, 20, 120, 105, None]


def test_task_conversations_are_train_split_and_bilingual():
    convs = task_conversations({"arithmetic": [1, 2]}, 40, seed=0)
    assert len(convs) == 40
    task = get_task("arithmetic")
    test_prompts = {
        p.prompt
        for lang in ("en", "zh")
        for d in (1, 2)
        for p in task.generate(30, seed=0, difficulty=d, split="test", lang=lang)
    }
    assert not {c[0]["content"] for c in convs} & test_prompts
    assert sum("计算" in c[0]["content"] for c in convs) == 20
