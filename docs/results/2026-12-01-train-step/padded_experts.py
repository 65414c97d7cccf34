# The six expert products of one MoE layer (forward and backward, bf16 or fp32) as the trainer runs
# them (split per expert) against one batched product over rows padded to a common capacity.
#   python padded_experts.py bf16|fp32
import time, torch, sys
from nanoseek.model.moe import _grouped_mm_few_shapes, ROW_BLOCK
torch.manual_seed(0)
E, d, I, N, K = 16, 256, 128, 2048, 4
dt = torch.bfloat16 if sys.argv[1] == "bf16" else torch.float32

def slots(offsets, C):
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    M = int(offsets[-1])
    starts = offsets.long() - counts
    e = torch.repeat_interleave(torch.arange(len(counts)), counts, output_size=M)
    j = torch.arange(M) - starts[e]
    return e * C + j

def padded(a, b, offsets):
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    C = (int(counts.max()) + ROW_BLOCK - 1) // ROW_BLOCK * ROW_BLOCK
    Ecount = offsets.shape[0]
    s = slots(offsets, C)
    if b.dim() == 3:   # [M,K] @ [E,K,N] -> [M,N]
        A = a.new_zeros(Ecount * C, a.shape[1]).index_copy_(0, s, a).view(Ecount, C, -1)
        out = torch.bmm(A, b).view(Ecount * C, -1)
        return out.index_select(0, s)
    # [K,M] @ [M,N] -> [E,K,N]
    A = a.new_zeros(Ecount * C, a.shape[0]).index_copy_(0, s, a.t()).view(Ecount, C, -1)
    B = b.new_zeros(Ecount * C, b.shape[1]).index_copy_(0, s, b).view(Ecount, C, -1)
    return torch.bmm(A.transpose(1, 2), B)

def run(fn, counts):
    M = int(counts.sum())
    off = counts.cumsum(0).to(torch.int32)
    x = torch.randn(M, d, dtype=dt); h = torch.randn(M, I, dtype=dt)
    wgu = torch.randn(E, d, 2 * I, dtype=dt); wd = torch.randn(E, I, d, dtype=dt)
    g = torch.randn(M, d, dtype=dt); g2 = torch.randn(M, 2 * I, dtype=dt)
    t = time.perf_counter()
    r = [fn(x, wgu, off), fn(h, wd, off), fn(g, wd.mT, off), fn(g.t(), h, off), fn(g2, wgu.mT, off), fn(g2.t(), x, off)]
    el = time.perf_counter() - t
    return el, r
# correctness
c = torch.bincount(torch.randint(0, E, (N * K,)), minlength=E)
_, r1 = run(_grouped_mm_few_shapes if dt == torch.bfloat16 else (lambda a,b,o: torch.nn.functional.grouped_mm(a,b,offs=o)), c)
torch.manual_seed(1)
base = _grouped_mm_few_shapes if dt == torch.bfloat16 else (lambda a,b,o: torch.nn.functional.grouped_mm(a,b,offs=o))
for name, fn in (("split", base), ("padded", padded), ("split", base), ("padded", padded)):
    ts = [run(fn, torch.bincount(torch.randint(0, E, (N * K,)), minlength=E))[0] for _ in range(40)]
    print(name, "first10 %.1f ms, last20 median %.1f ms" % (sum(ts[:10]) / 10 * 1000, sorted(ts[20:])[10] * 1000))
# value check on same inputs
torch.manual_seed(5)
M = int(c.sum()); off = c.cumsum(0).to(torch.int32)
x = torch.randn(M, d, dtype=dt); w = torch.randn(E, d, 2*I, dtype=dt); g2 = torch.randn(M, 2*I, dtype=dt)
print("max diff fwd", (base(x, w, off).float() - padded(x, w, off).float()).abs().max().item(),
      "wgrad", (base(g2.t(), x, off).float() - padded(g2.t(), x, off).float()).abs().max().item())
