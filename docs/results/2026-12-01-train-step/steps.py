# Per-step milliseconds of the benchmark's reference step (nanoseek, forward + backward + AdamW, 8 x 256) over N steps.
#   ATT=math|fp32|bf16 python steps.py moe|dense bf16|fp32 1|0(compiled) N     (from the repo root)
# per-step time of the compiled bf16 step over many steps: MoE vs dense (oneDNN shape cache warm-up?)
import copy, os, sys, time, torch
sys.path.insert(0, "benchmarks")
from train_step import dense_twin, ours_step
from nanoseek import ModelConfig, Transformer
from nanoseek.train import precision
from nanoseek.hostmem import tune_host_memory
tune_host_memory(huge_pages=False)
torch.manual_seed(0)
cfg = ModelConfig()
which = sys.argv[1]; prec = sys.argv[2]; comp = sys.argv[3] == "1"; n = int(sys.argv[4])
model = Transformer(cfg if which == "moe" else dense_twin(cfg)).train()
ids = torch.randint(0, cfg.vocab_size, (8, 256))
if prec == "bf16":
    precision.set_attention_kernel(model, os.environ.get("ATT", "fp32"))
run = torch.compile(model) if comp else model
step = ours_step(run, ids, prec)
ts = []
for i in range(n):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
print(which, prec, comp, " ".join(f"{x*1000:.0f}" for x in ts))
import statistics
print("best", min(ts[2:])*1000, "median last half", statistics.median(ts[n//2:])*1000, "tok/s best", 2048/min(ts[2:]))
