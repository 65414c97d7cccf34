# The cpu preset's model: compiled bf16 step at [B, T] with the attention kernel ATT (math, fp32, bf16).
#   ATT=math python steps_cpu.py 16 256 25     (from the repo root)
# the cpu preset's model: compiled bf16 train step at [B, T] with a given attention kernel
import json, os, sys, time, torch
sys.path.insert(0, "benchmarks")
from train_step import ours_step
from nanoseek import ModelConfig, Transformer
from nanoseek.train import precision
from nanoseek.hostmem import tune_host_memory
tune_host_memory(huge_pages=False)
torch.manual_seed(0)
preset = json.load(open("src/nanoseek/configs/cpu.json"))
cfg = ModelConfig(**{**preset["model"], "vocab_size": 4096})
B, T, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = Transformer(cfg).train()
ids = torch.randint(0, cfg.vocab_size, (B, T))
precision.set_attention_kernel(model, os.environ.get("ATT", "fp32"))
step = ours_step(torch.compile(model) if os.environ.get("EAGER") is None else model, ids, "bf16")
ts = []
for i in range(n):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
import statistics
print(os.environ.get("ATT"), "best %.1f median-last-half %.1f ms" % (min(ts[2:]) * 1000, statistics.median(ts[n // 2:]) * 1000))
