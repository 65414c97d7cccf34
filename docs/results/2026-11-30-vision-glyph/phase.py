"""The `vision` preset's glyph phase alone: the stage's own `glyph_phase` on a fresh tower of the
preset's shape, over the preset's reading tasks and difficulties, read back on the stage's held-out
problems of those tasks (the preset's eval_problems at each task's highest difficulty, the stage's
render seeds); no language model is trained.

    PYTHONPATH=src python docs/results/2026-11-30-vision-glyph/phase.py CKPT OUT [key=json ...]

key: glyph.FIELD (glyph.steps=600, glyph.tasks={"visual_equation":[1,2]}). Writes
OUT/glyph/{vision.safetensors,summary.json} and prints the summary."""

import json
import sys
from pathlib import Path

import torch

from nanoseek.config import ModelConfig, VisionConfig
from nanoseek.model.vision import VisionTower
from nanoseek.presets import load_preset
from nanoseek.stages.glyph import READING_TASKS, glyph_phase, glyph_settings
from nanoseek.train.vision import visual_problems

ckpt, out = sys.argv[1], Path(sys.argv[2])
section = dict(load_preset("vision")["vision"])
section["glyph"] = dict(section["glyph"])
for arg in sys.argv[3:]:
    key, value = arg.split("=", 1)
    part, field = key.split(".")
    section[part][field] = json.loads(value)
settings = glyph_settings(section)
torch.manual_seed(0)
tower = VisionTower(
    VisionConfig(**section["vision"]), ModelConfig.from_pretrained(ckpt).hidden_size
)
held_out = {
    name: visual_problems({name: [max(d)]}, section["eval_problems"], split="test", seed=1)
    for name, d in (settings["tasks"] or section["tasks"]).items()
    if name in READING_TASKS
}
summary = glyph_phase(tower, section, settings, held_out, out / "glyph")
print(json.dumps(summary, ensure_ascii=False), flush=True)
