"""Does the tower alone learn to read? Glyph pretraining (stages/glyph.py: CTC over the columns
of the adaptor's output grid) of the vision preset's tower on ONE reading task at difficulty 1, then
best-path decoding of the stage's 150 held-out problems and pictures (split "test", seed 1, render
seed 100 000 + i, as screen.py) and of 150 training keys rendered afresh (seed 200 000 + i).

    PYTHONPATH=src python docs/results/2026-11-30-vision-glyph/tower.py CKPT OUT TASK [key=json ...]

CKPT gives the language model's width (the adaptor's output). key: vision.FIELD, steps,
batch_size, lr, problems_per_task. Writes OUT/tower.json and OUT/vision.safetensors (the tower, no
head: screen.py TOWER=OUT/vision.safetensors starts from it)."""

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.config import ModelConfig, VisionConfig
from nanoseek.eval.stats import wilson_interval
from nanoseek.model.vision import VisionTower
from nanoseek.stages.glyph import glyphs, greedy_read, pretrain_glyphs
from nanoseek.train.vision import visual_problems

ckpt, out, task_name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
settings = {
    "vision": {
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
        "max_tiles": 4,
    },
    "steps": 300,
    "batch_size": 32,
    "lr": 0.002,
    "problems_per_task": 600,
    "difficulty": 1,
}
for arg in sys.argv[4:]:
    key, value = arg.split("=", 1)
    *parents, last = key.split(".")
    d = settings
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = json.loads(value)
out.mkdir(parents=True, exist_ok=True)
d = settings["difficulty"]
lm_width = ModelConfig.from_pretrained(ckpt).hidden_size
vcfg = VisionConfig(**settings["vision"])
torch.manual_seed(0)
tower = VisionTower(vcfg, lm_width)
train = visual_problems({task_name: [d]}, settings["problems_per_task"], split="train")
test = visual_problems({task_name: [d]}, 150, split="test", seed=1)
charset = sorted({c for p in train + test for c in glyphs(p)})
start = time.perf_counter()
head, rows = pretrain_glyphs(
    tower,
    train,
    steps=settings["steps"],
    batch_size=settings["batch_size"],
    lr=settings["lr"],
    log=lambda r: print(json.dumps(r), flush=True),
    charset=charset,
)
wall = time.perf_counter() - start
tower.eval()
result = {
    "task": task_name,
    "overrides": sys.argv[4:],
    "settings": settings,
    "wall_s": round(wall, 1),
}
for name, probs, base in (("held_out", test, 100_000), ("trained_keys", train[:150], 200_000)):
    exact, reads = greedy_read(tower, head, probs, [base + i for i in range(len(probs))], vcfg)
    truths = [glyphs(p) for p in probs]
    result[name] = {
        "n": len(probs),
        "distinct_truths": len(set(truths)),
        "read_ok": exact,
        "read_wilson95": [round(x, 4) for x in wilson_interval(exact, len(probs))],
        "distinct_reads": len(set(reads)),
        "most_common_reads": Counter(reads).most_common(3),
        "examples": [{"truth": t, "read": r} for t, r in list(zip(truths, reads))[:8]],
    }
result["losses"] = rows
save_file(
    {k: v.contiguous() for k, v in tower.state_dict().items()}, str(out / "vision.safetensors")
)
(out / "tower.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")
print(json.dumps({k: result[k] for k in ("task", "wall_s", "held_out")}, ensure_ascii=False))
