"""R1-Distill at our scale: a teacher writes reasoning traces, the task grader keeps the correct
ones, and a student learns them by SFT.

    train-split problems ─► teacher (engine, n samples each, temperature)
        ─► grader: correct and well formed?
        ─► kept traces as chat JSONL (out/traces.jsonl) ─► SFT of the student on them ─► out/final

`answer_only_conversations` builds the control experiment: the same prompts with the gold answer and
no worked reasoning, so a comparison isolates what the traces themselves teach.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model
from nanoseek.data.chat_tokens import Messages, read_chat_jsonl, write_chat_jsonl
from nanoseek.engine import Engine
from nanoseek.eval.accuracy import generate_completions
from nanoseek.tasks import Problem, get_task, parse_completion
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import dist
from nanoseek.train.sft import TRAIN_DEFAULTS, run_sft

DEFAULTS = {
    "tasks": {"arithmetic": [1, 2], "word_problems": [1]},
    "problems_per_task": 400,  # train-split problems the teacher attempts, per task
    "langs": ["en", "zh"],
    "samples": 4,  # completions per problem
    "temperature": 0.7,
    "top_k": 20,
    "max_new_tokens": 192,
    "keep_per_problem": 2,  # distinct verified traces kept per problem
    "targets": "traces",  # or "answer_only": the control experiment
    "data_seed": 1,
}
ANSWER_ONLY_REASONING = {"en": "I will give the answer directly.", "zh": "我直接给出答案。"}


def trace_messages(problem: Problem, completion: str) -> Messages:
    """A verified completion (think prefilled) as a training
    conversation in the chat template's shape."""
    parsed = parse_completion(completion, think_prefilled=True)
    return [
        {"role": "user", "content": problem.prompt},
        {
            "role": "assistant",
            "reasoning_content": parsed.think.strip(),
            "content": f"<answer>{parsed.answer}</answer>",
        },
    ]


def verified_traces(
    task,
    problems: Sequence[Problem],
    completions: Sequence[Sequence[str]],
    keep_per_problem: int = 1,
) -> tuple[list[Messages], dict]:
    """Keep completions that the grader marks correct with a perfect format score, at most
    keep_per_problem distinct ones per problem. -> (conversations, counts)."""
    flat = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    rewards = (
        task.grade_many([p for p, _ in flat], [c for _, c in flat], think_prefilled=True)
        if flat
        else []
    )
    kept: dict[str, list[str]] = {}
    for (p, c), r in zip(flat, rewards):
        traces = kept.setdefault(p.id, [])
        if (
            r.correct
            and r.format == 1.0
            and c.strip() not in traces
            and len(traces) < keep_per_problem
        ):
            traces.append(c.strip())
    by_id = {p.id: p for p in problems}
    conversations = [trace_messages(by_id[pid], c) for pid, cs in kept.items() for c in cs]
    counts = {
        "problems": len(problems),
        "samples": len(flat),
        "correct": sum(r.correct for r in rewards),
        "verified": sum(r.correct and r.format == 1.0 for r in rewards),
        "problems_solved": sum(bool(cs) for cs in kept.values()),
        "kept": len(conversations),
    }
    return conversations, counts


def train_problems(cfg: dict) -> dict[str, list[Problem]]:
    out = {}
    for name, difficulties in cfg["tasks"].items():
        task, problems = get_task(name), []
        cells = [(d, lang) for d in difficulties for lang in cfg["langs"]]
        for k, (d, lang) in enumerate(cells):
            n = cfg["problems_per_task"] // len(cells) + (k < cfg["problems_per_task"] % len(cells))
            problems += (
                task.generate(n, seed=cfg["data_seed"], difficulty=d, split="train", lang=lang)
                if n
                else []
            )
        out[name] = problems
    return out


def teacher_traces(teacher: str | Path, cfg: dict) -> tuple[list[Messages], dict]:
    """The teacher samples `samples` completions per train problem; the
    verified ones become conversations."""
    model = load_model(teacher, dtype=torch.float32)
    tok = load_tokenizer(teacher)
    engine = Engine(model, None, max_batch_size=64, max_num_batched_tokens=2048, decode="eager")
    conversations, stats = [], {}
    for name, problems in train_problems(cfg).items():
        completions, _ = generate_completions(
            engine,
            tok,
            problems,
            n=cfg["samples"],
            temperature=cfg["temperature"],
            top_k=cfg["top_k"],
            max_new_tokens=cfg["max_new_tokens"],
            seed=cfg["data_seed"],
        )
        convs, stats[name] = verified_traces(
            get_task(name), problems, completions, cfg["keep_per_problem"]
        )
        conversations += convs
    return conversations, stats


def answer_only_conversations(conversations: Sequence[Messages]) -> list[Messages]:
    """The same prompts and answers with a fixed one-line reasoning instead
    of the worked trace: the control."""
    out = []
    for conv in conversations:
        user, assistant = conv[0], conv[-1]
        lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in user["content"]) else "en"
        out.append(
            [
                user,
                {
                    "role": "assistant",
                    "reasoning_content": ANSWER_ONLY_REASONING[lang],
                    "content": assistant["content"],
                },
            ]
        )
    return out


def split_settings(section: dict) -> tuple[dict, dict]:
    """A preset "distill" section -> (distillation settings, SFT TrainConfig fields)."""
    cfg = {**DEFAULTS, **{k: v for k, v in section.items() if k in DEFAULTS}}
    train = {**TRAIN_DEFAULTS, **{k: v for k, v in section.items() if k not in DEFAULTS}}
    if cfg["targets"] not in ("traces", "answer_only"):
        raise ValueError(f"distill.targets={cfg['targets']!r}: use 'traces' or 'answer_only'")
    return cfg, train


def distill(
    teacher: str | Path | None,
    student: str | Path,
    out: str | Path,
    section: dict | None = None,
    *,
    traces: str | Path | None = None,
    info: dist.DistInfo | None = None,
) -> dict:
    """Teacher traces -> SFT of the student checkpoint -> out/final. The traces are generated once
    into out/traces.jsonl (reused on a rerun); `traces` points to an existing file instead, e.g. to
    train the answer-only control on exactly the same problems."""
    cfg, train = split_settings(section or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    traces_file = Path(traces) if traces else out / "traces.jsonl"
    stats = None
    if traces_file.is_file():
        conversations = read_chat_jsonl(traces_file)
    else:
        if teacher is None:
            raise ValueError(
                f"{traces_file}: no traces file, and no teacher checkpoint to generate them"
            )
        conversations, stats = teacher_traces(teacher, cfg)
        if not conversations:
            raise RuntimeError(
                f"the teacher {teacher} solved none of the problems: nothing to distill"
            )
        write_chat_jsonl(traces_file, conversations)
    if cfg["targets"] == "answer_only":
        conversations = answer_only_conversations(conversations)
    summary = run_sft(student, out, conversations, train, info=info)
    return {
        "teacher": str(teacher),
        "traces_file": str(traces_file),
        "student": str(student),
        "targets": cfg["targets"],
        "traces": len(conversations),
        "teacher_stats": stats,
        **summary,
    }
