"""The reading diagnosis of a screening run's final model on TRAINING keys (split "train", the
first 150 problems the stage trained on), drawn afresh (render seed 200 000 + i): does the model
transcribe the keys it was trained on, from pictures it has not seen?

    PYTHONPATH=src python docs/results/2026-11-30-vision-read/seen.py OUT TASK"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch

from nanoseek.checkpoint import load_vision_language_model
from nanoseek.data.chat_tokens import completion_text
from nanoseek.data.images import image_prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.accuracy import token_budget
from nanoseek.eval.stats import wilson_interval
from nanoseek.tasks.visual import SYMBOL, get_visual_task
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.vision import visual_problems

out, task_name = Path(sys.argv[1]), sys.argv[2]
torch.set_grad_enabled(False)
vlm = load_vision_language_model(out / "vision" / "final", dtype=torch.float32)
vlm.eval()
tok = load_tokenizer(out / "vision" / "final")
engine = Engine(vlm, tok, max_batch_size=64, max_num_batched_tokens=2048, decode="eager")
task = get_visual_task(task_name)
probs = visual_problems({task_name: [1]}, 600, split="train", seed=0)[:150]
prompts, images, params = [], [], []
for i, p in enumerate(probs):
    img = task.render(p, seed=200_000 + i)
    ids, inputs = image_prompt_ids(tok, p.prompt, [img], vlm.vision.config)
    prompts.append(ids)
    images.append(inputs)
    params.append(
        SamplingParams(
            max_tokens=token_budget(tok, p, 48), temperature=0.0, stop_token_ids=[tok.eos_id]
        )
    )
texts = [completion_text(tok, o.token_ids) for o in engine.generate(prompts, params, images=images)]
rewards = task.grade_many(probs, texts, think_prefilled=True)
firsts = [t.strip().split("\n")[0].strip() for t in texts]
truths = []
for p in probs:
    m = p.metadata
    truths.append(
        f"{m['a']} {SYMBOL[m['op']]} {m['b']}"
        if task_name == "visual_equation"
        else " ".join(p.answer)
    )
read_ok = sum(f == t for f, t in zip(firsts, truths))
correct = sum(bool(r.correct) for r in rewards)
result = {
    "task": task_name,
    "split": "train (trained keys, fresh renders)",
    "n": len(probs),
    "distinct_truths": len(set(truths)),
    "correct": correct,
    "wilson95": [round(x, 4) for x in wilson_interval(correct, len(probs))],
    "read_ok": read_ok,
    "read_wilson95": [round(x, 4) for x in wilson_interval(read_ok, len(probs))],
    "distinct_first_lines": len(set(firsts)),
    "most_common_first_lines": Counter(firsts).most_common(3),
    "examples": [{"truth": t, "first": f} for t, f in list(zip(truths, firsts))[:8]],
}
(out / "seen.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")
print(json.dumps(result, ensure_ascii=False), flush=True)
