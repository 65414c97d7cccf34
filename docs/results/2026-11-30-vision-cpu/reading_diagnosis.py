"""Where the held-out equation / word answers go wrong: reading or computing.
PYTHONPATH=src python docs/results/2026-11-30-vision-cpu/reading_diagnosis.py CKPT OUT [TASK...]

The stage's held-out problems (difficulty 2, 200 per task, split "test", seed 1) and pictures
(render seed 100 000 + i), greedy through the engine as eval/visual.py does; per problem whether
the first line of the reasoning (what the model wrote down as read) equals the truth, and its
similarity ratio to it. DIFF=1 in the environment: difficulty 1 instead."""

import json
import os
import sys
from collections import Counter
from difflib import SequenceMatcher

import torch

from nanoseek.checkpoint import load_vision_language_model
from nanoseek.data.chat_tokens import completion_text
from nanoseek.data.images import image_prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.accuracy import token_budget
from nanoseek.tasks.visual import SYMBOL, get_visual_task
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.vision import visual_problems

ckpt = sys.argv[1]
DIFFICULTY = int(os.environ.get("DIFF", "2"))  # DIFF=1: the warm-up level
tasks = sys.argv[3:] or ["visual_equation", "visual_word"]
torch.set_grad_enabled(False)
vlm = load_vision_language_model(ckpt, dtype=torch.float32)
vlm.eval()
tok = load_tokenizer(ckpt)
engine = Engine(vlm, tok, max_batch_size=64, max_num_batched_tokens=2048, decode="eager")
out = {}
for name in tasks:
    task = get_visual_task(name)
    probs = visual_problems({name: [DIFFICULTY]}, 200, split="test", seed=1)
    prompts, images, params = [], [], []
    for i, p in enumerate(probs):
        img = task.render(p, seed=100_000 + i)
        ids, inputs = image_prompt_ids(tok, p.prompt, [img], vlm.vision.config)
        prompts.append(ids)
        images.append(inputs)
        params.append(
            SamplingParams(
                max_tokens=token_budget(tok, p, 48), temperature=0.0, stop_token_ids=[tok.eos_id]
            )
        )
    texts = [
        completion_text(tok, o.token_ids) for o in engine.generate(prompts, params, images=images)
    ]
    rewards = task.grade_many(probs, texts, think_prefilled=True)
    rows = []
    for p, t, r in zip(probs, texts, rewards):
        first = t.strip().split("\n")[0].strip()
        row = {
            "key": p.key,
            "lang": p.lang,
            "answer": p.answer,
            "completion": t,
            "correct": bool(r.correct),
        }
        if name == "visual_equation":
            m = p.metadata
            truth = f"{m['a']} {SYMBOL[m['op']]} {m['b']}"
            row["read_ok"] = first == truth
            row["read_ratio"] = SequenceMatcher(None, first, truth).ratio()
        else:
            truth = " ".join(p.answer)
            row["read_ok"] = first == truth
            row["read_ratio"] = SequenceMatcher(None, first, truth).ratio()
        rows.append(row)
    n = len(rows)
    out[name] = {
        "n": n,
        "correct": sum(r["correct"] for r in rows),
        "read_ok": sum(r["read_ok"] for r in rows),
        "correct_given_read_ok": sum(r["correct"] for r in rows if r["read_ok"]),
        "mean_read_ratio": round(sum(r["read_ratio"] for r in rows) / n, 3),
        "by_lang": {
            lang: {
                "n": sum(r["lang"] == lang for r in rows),
                "correct": sum(r["correct"] for r in rows if r["lang"] == lang),
                "mean_read_ratio": round(
                    sum(r["read_ratio"] for r in rows if r["lang"] == lang)
                    / max(1, sum(r["lang"] == lang for r in rows)),
                    3,
                ),
            }
            for lang in ("en", "zh")
        },
        "first_lines": {
            lang: Counter(
                r["completion"].strip().split("\n")[0] for r in rows if r["lang"] == lang
            ).most_common(5)
            for lang in ("en", "zh")
        },
        "first": rows[:12],
    }
    print(
        name, {k: v for k, v in out[name].items() if k not in ("first", "first_lines")}, flush=True
    )
json.dump(out, open(sys.argv[2], "w"), ensure_ascii=False, indent=1)
