"""Seconds per pretraining step (16 x 256 tokens, forward + backward + AdamW, fp32) of model
shapes: the cpu preset's model section with overrides. Used to give every shape of the sweep the
same wall time. Random tokens; 2 warm-up steps, then the median of 4 timed steps. "_batch" and
"_seq" in an override set the rows and their length (default 16 x 256).

    python docs/results/2026-11-30-recipe/shape_probe.py '{"num_nextn_predict_layers": 0}' ...
"""

import json
import statistics
import sys
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.model import Transformer
from nanoseek.presets import load_preset

steps = 4
base = load_preset("cpu")["model"]
for arg in sys.argv[1:]:
    over = json.loads(arg)
    batch = over.pop("_batch", 16)
    seq = over.pop("_seq", 256)
    cfg = ModelConfig(**{**base, "vocab_size": 8192, **over})
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    s = statistics.median(times[2:])
    n = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "shape": over,
                "params": n,
                "s_per_step": round(s, 3),
                "rows": [batch, seq],
                "tokens_per_s": round(batch * seq / s),
            }
        )
    )
