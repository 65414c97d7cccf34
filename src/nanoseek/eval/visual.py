"""Held-out visual-task accuracy of a vision-language model: greedy answers through the engine
(images in the prompt, engine/engine.py), graded by each task, with 95% Wilson score intervals.

Each held-out problem is rendered with its own seed (never a training rendering), prompted with the
chat template's `<think>\\n` generation prompt like the text tasks (eval/accuracy.py), and graded
with think prefilled (the interval: eval/stats.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from nanoseek.data.chat_tokens import completion_text
from nanoseek.data.images import image_prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.accuracy import token_budget
from nanoseek.eval.stats import wilson_interval
from nanoseek.tasks.visual import CHANCE, get_visual_task

# held-out pictures: problem i drawn with render seed EVAL_RENDER_SEED + i (no training render uses
# these seeds)
EVAL_RENDER_SEED = 100_000


def evaluate_visual_task(
    engine: Engine,
    tok,
    problems: Sequence,
    *,
    render_seed: int = EVAL_RENDER_SEED,
    size: tuple[int, int] | None = None,
    max_new_tokens: int = 64,
    samples: int = 0,
) -> dict:
    """Greedy pass@1 over `problems` (all of one visual task) -> {problems, correct, accuracy,
    wilson95, chance, outcomes: each problem's correctness in order, samples: the first few
    (image, question, completion, correct)}."""
    if not problems:
        raise ValueError("no problems to evaluate")
    task = get_visual_task(problems[0].task)
    vcfg = engine.vision.config
    prompts = []
    images = []
    params = []
    for i, p in enumerate(problems):
        img = task.render(p, seed=render_seed + i, size=size)
        ids, inputs = image_prompt_ids(tok, p.prompt, [img], vcfg)
        prompts.append(ids)
        images.append((img, inputs))
        budget = token_budget(tok, p, max_new_tokens)
        params.append(
            SamplingParams(max_tokens=budget, temperature=0.0, stop_token_ids=[tok.eos_id])
        )
    outs = engine.generate(prompts, params, images=[inputs for _, inputs in images])
    texts = [completion_text(tok, o.token_ids) for o in outs]
    rewards = task.grade_many(list(problems), texts, think_prefilled=True)
    correct = sum(r.correct for r in rewards)
    lo, hi = wilson_interval(correct, len(problems))
    return {
        "problems": len(problems),
        "distinct_keys": len({p.key for p in problems}),
        "correct": correct,
        "accuracy": round(correct / len(problems), 4),
        "wilson95": [round(lo, 4), round(hi, 4)],
        "chance": round(CHANCE[task.name], 4),
        "outcomes": [bool(r.correct) for r in rewards],
        "samples": [
            {
                "image": img,
                "question": p.prompt,
                "answer": p.answer,
                "completion": t,
                "correct": r.correct,
            }
            for p, (img, _), t, r in list(zip(problems, images, texts, rewards))[:samples]
        ],
    }
