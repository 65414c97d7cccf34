"""The export stage: the run's last checkpoint copied to runs/NAME/final with a model card
(README.md), and its greedy answers to a few prompts in runs/NAME/export/samples.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model
from nanoseek.data.chat_tokens import prompt_ids
from nanoseek.io import atomic_dir, atomic_write_text
from nanoseek.reporting.model_card import write_model_card
from nanoseek.stages.common import latest_checkpoint, run_stage
from nanoseek.train.dist import DistInfo

SAMPLE_PROMPTS = [  # (language, prompt): chat in both languages, a recall question from the corpus
    ("en", "Who are you?"),
    ("zh", "你好，你是谁？"),
    ("en", "How does Genesis 1 begin?"),
]
SAMPLE_TASKS = [
    ("arithmetic", 1, "en"),
    ("arithmetic", 1, "zh"),
    ("countdown", 1, "en"),
    ("word_problems", 1, "zh"),
]


def export_stage(run: Path, preset: dict, info: DistInfo) -> dict:
    """The run's last checkpoint copied to runs/NAME/final with a model card (README.md); sample
    answers in runs/NAME/export/samples.json."""

    def work():
        source = latest_checkpoint(run)
        if source is None:
            raise FileNotFoundError(f"{run}: no finished checkpoint to export")
        final = run / "final"
        with atomic_dir(final) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            samples = sample_answers(tmp)
            samples_json = json.dumps(samples, indent=2, ensure_ascii=False) + "\n"
            atomic_write_text(run / "export" / "samples.json", samples_json)
            write_model_card(run, tmp, preset, samples)
        return {"source": str(source), "checkpoint": str(final), "samples": len(samples)}

    return run_stage("export", run / "export", info, work)


@torch.no_grad()
def sample_answers(ckpt: Path, max_new_tokens: int = 200) -> list[dict]:
    """Greedy answers of the checkpoint to a few chat prompts and held-out task problems, English
    and Chinese, split into reasoning and answer; task answers graded."""
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.serve.chat_format import split_reasoning
    from nanoseek.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer

    model, tok = load_model(ckpt, dtype=torch.float32).eval(), load_tokenizer(ckpt)
    items = [{"lang": lang, "prompt": text} for lang, text in SAMPLE_PROMPTS]
    problems = []
    for name, difficulty, lang in SAMPLE_TASKS:
        task = get_task(name)
        problem = task.generate(1, seed=0, difficulty=difficulty, split="test", lang=lang)[0]
        problems.append((len(items), problem))
        items.append(
            {"lang": lang, "prompt": problem.prompt, "task": name, "expected": problem.answer}
        )
    engine = Engine(model, None, max_batch_size=len(items), decode="eager")
    prompts = [prompt_ids(tok, it["prompt"]) for it in items]
    room = engine.max_model_len - max(len(p) for p in prompts)
    params = SamplingParams(
        max_tokens=max(1, min(max_new_tokens, room)), temperature=0.0, stop_token_ids=[tok.eos_id]
    )
    outputs = engine.generate(prompts, params)
    for it, out in zip(items, outputs):
        ids = [t for t in out.outputs[0].token_ids if t != tok.eos_id]
        text = tok.decode(ids)  # special tokens kept: the grader reads <answer>…</answer>
        reasoning, answer = split_reasoning(text, True)  # the prompt opened <think>
        it.update(
            reasoning=(reasoning or "").strip(),
            answer=answer.strip(),
            completion=text,
            finish_reason=out.outputs[0].finish_reason,
        )
    for index, problem in problems:
        completion = items[index]["completion"]
        reward = get_task(problem.task).grade(problem, completion, think_prefilled=True)
        items[index].update(correct=reward.correct, accuracy=reward.accuracy)
    return items
