"""Continue a run's pretrained checkpoint on its own shards for more steps (a second WSD cycle,
re-warmed), exported to runs/NAME/<stage>/final: the nearest this session could come to a longer
pretraining run in the time it had. Not a pipeline stage.

    python docs/results/2026-11-30-recipe/continue_pretraining.py runs/NAME STAGE STEPS [SEED]
"""

import json
import sys
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model
from nanoseek.presets import load_preset
from nanoseek.stages.pretrain import train_on_shards
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.dist import DistInfo
from nanoseek.train.trainer import TrainConfig

run = Path(sys.argv[1])
stage = sys.argv[2]
steps = int(sys.argv[3])
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
base = run / "pretrain" / "final"
model = load_model(base, dtype=torch.float32)
tok = load_tokenizer(base)
cfg = {**load_preset("cpu")["pretrain"], "max_time": None, "max_steps": steps}
cfg.update(warmup_steps=20, eval_every=100000, save_every=100000, log_every=20, seed=seed)
tcfg = TrainConfig(**{**cfg, "out_dir": str(run / stage)})
print(json.dumps(train_on_shards(run, stage, model, tcfg, tok, DistInfo()), indent=1))
