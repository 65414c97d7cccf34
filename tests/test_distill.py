"""Distillation: only verified traces are kept, they become well-formed training conversations, and
the student is fine-tuned on them (or, for the control, on answer-only targets)."""

import subprocess
import sys

import pytest

from nanoseek.data.chat_tokens import (
    completion_text,
    prompt_ids,
    read_chat_jsonl,
    tokenize_conversation,
    write_chat_jsonl,
)
from nanoseek.tasks import get_task
from nanoseek.train import distill as distill_module
from nanoseek.train.distill import (
    answer_only_conversations,
    distill,
    trace_messages,
    verified_traces,
)

from helpers import save_tiny, small_tokenizer


def arithmetic(n=3):
    return get_task("arithmetic").generate(n, seed=5, difficulty=2)


def test_only_correct_well_formed_distinct_traces_are_kept():
    task, problems = get_task("arithmetic"), arithmetic()
    right = [p.solution.completion(think_prefilled=True) for p in problems]
    completions = [
        # a duplicate, a wrong answer
        [right[0], right[0] + " ", "I think\n</think>\n<answer>1</answer>"],
        [
            right[1].replace("</think>\n", ""),  # right answer, no think close: format < 1
            f"other steps\n</think>\n<answer>{problems[1].answer}</answer>",
        ],
        # right answer, empty think: format < 1
        [
            f"</think>\n<answer>{problems[2].answer}</answer>",
            f"steps\n</think>\n<answer>{problems[2].answer}</answer> extra",
        ],  # trailing text: voided
    ]
    convs, counts = verified_traces(task, problems, completions, keep_per_problem=2)
    assert [c[1]["reasoning_content"] for c in convs] == [
        problems[0].solution.reasoning,
        "other steps",
    ]
    assert [c[0]["content"] for c in convs] == [problems[0].prompt, problems[1].prompt]
    assert counts == {
        "problems": 3,
        "samples": 7,
        "correct": 5,
        "verified": 3,
        "problems_solved": 2,
        "kept": 2,
    }
    one, _ = verified_traces(task, problems, completions, keep_per_problem=1)
    assert len(one) == 2


def test_a_trace_becomes_a_conversation_that_reproduces_it():
    tok, task = small_tokenizer(), get_task("arithmetic")
    problem = arithmetic(1)[0]
    completion = f"my own steps\n= {problem.answer}\n</think>\n<answer>{problem.answer}</answer>"
    ids, mask = tokenize_conversation(tok, trace_messages(problem, completion))
    prompt = prompt_ids(tok, problem.prompt)
    assert ids[: len(prompt)] == prompt and mask.index(True) == len(prompt)
    assert completion_text(tok, ids[len(prompt) :]) == completion
    assert task.grade(
        problem, completion_text(tok, ids[len(prompt) :]), think_prefilled=True
    ).correct


def test_answer_only_control_keeps_prompts_and_answers():
    problems = arithmetic(2) + get_task("arithmetic").generate(1, seed=5, difficulty=1, lang="zh")
    convs = [trace_messages(p, p.solution.completion(True)) for p in problems]
    control = answer_only_conversations(convs)
    assert [c[0] for c in control] == [c[0] for c in convs]
    assert [c[1]["content"] for c in control] == [f"<answer>{p.answer}</answer>" for p in problems]
    assert [c[1]["reasoning_content"] for c in control] == [
        "I will give the answer directly.",
        "I will give the answer directly.",
        "我直接给出答案。",
    ]


def test_teacher_traces_keep_only_what_the_grader_verifies(tmp_path, monkeypatch):
    teacher = save_tiny(tmp_path / "teacher")

    # a teacher right on every other problem
    def fake_generate(engine, tok, problems, n=1, **kwargs):
        out = []
        for i, p in enumerate(problems):
            good = p.solution.completion(think_prefilled=True)
            out.append(
                [good if i % 2 == 0 else good.replace(f">{p.answer}<", ">-1<"), "no format"][:n]
            )
        return out, [True] * len(problems)

    monkeypatch.setattr(distill_module, "generate_completions", fake_generate)
    cfg = {
        **distill_module.DEFAULTS,
        "tasks": {"arithmetic": [1], "word_problems": [1]},
        "problems_per_task": 6,
        "samples": 2,
    }
    convs, stats = distill_module.teacher_traces(teacher, cfg)
    assert stats == {
        name: {
            "problems": 6,
            "samples": 12,
            "correct": 3,
            "verified": 3,
            "problems_solved": 3,
            "kept": 3,
        }
        for name in ("arithmetic", "word_problems")
    }
    problems = {p.prompt: p for ps in distill_module.train_problems(cfg).values() for p in ps}
    for conv in convs:
        p = problems[conv[0]["content"]]
        assert conv[1] == {
            "role": "assistant",
            "reasoning_content": p.solution.reasoning,
            "content": f"<answer>{p.answer}</answer>",
        }


def test_distill_trains_the_student_on_the_traces(tmp_path):
    student = save_tiny(tmp_path / "student", context=256)
    problems = arithmetic(6)
    traces = tmp_path / "traces.jsonl"
    write_chat_jsonl(traces, [trace_messages(p, p.solution.completion(True)) for p in problems])
    train = {
        "max_steps": 2,
        "batch_size": 2,
        "seq_len": 128,
        "save_every": 2,
        "eval_every": 2,
        "log_every": 1,
        "warmup_steps": 1,
        "progress": False,
    }
    for targets in ("traces", "answer_only"):
        out = tmp_path / targets
        summary = distill(None, student, out, {**train, "targets": targets}, traces=traces)
        assert summary["steps"] == 2 and summary["traces"] == 6 and summary["targets"] == targets
        assert (out / "final" / "model.safetensors").is_file() and (
            out / "final" / "tokenizer.json"
        ).is_file()
    assert read_chat_jsonl(traces)[0][1]["reasoning_content"] == problems[0].solution.reasoning
    with pytest.raises(ValueError, match="no teacher checkpoint"):
        distill(None, student, tmp_path / "x", train)
    with pytest.raises(ValueError, match="targets"):
        distill(None, student, tmp_path / "y", {"targets": "nope"}, traces=traces)


def test_set_applies_without_a_preset(tmp_path):
    """`nanoseek distill --set distill.X=…` with no --preset must not be
    ignored: a bad value is refused."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanoseek.cli",
            "distill",
            "--student",
            str(tmp_path / "s"),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "distill.targets=nope",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "distill.targets='nope'" in out.stderr
