"""Held-out visual-task accuracy of a vision-language model: greedy answers through the engine
(images in the prompt, engine/engine.py), graded by each task, with 95% Wilson score intervals.

Each held-out problem is rendered with its own seed (never a training rendering), prompted with the
chat template's `<think>\\n` generation prompt like the text tasks (eval/accuracy.py), and graded
with think prefilled. Wilson's interval for k successes in n trials at z = 1.96:
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),  p = k/n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from nanoseek.data.chat_tokens import completion_text
from nanoseek.data.images import image_prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.accuracy import token_budget
from nanoseek.tasks.visual import CHANCE, get_visual_task

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (0, 1 when n == 0)."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denom = 1 + z * z / n
    return max(0.0, (centre - spread) / denom), min(1.0, (centre + spread) / denom)


def evaluate_visual_task(
    engine: Engine,
    tok,
    problems: Sequence,
    *,
    render_seed: int = 100_000,
    size: tuple[int, int] | None = None,
    max_new_tokens: int = 64,
    samples: int = 0,
) -> dict:
    """Greedy pass@1 over `problems` (all of one visual task) -> {problems, correct, accuracy,
    wilson95, chance, samples: the first few (image, question, completion, correct)}."""
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
