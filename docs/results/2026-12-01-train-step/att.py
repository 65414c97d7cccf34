# Causal attention forward + backward at one shape, four ways: the fused SDPA kernel with bf16 or fp32
# inputs (values padded to the queries' width, as MLA pads them), and the two products unfused (bf16,
# fp32 softmax), eager and compiled. Milliseconds, best of 6 after 2 warm-ups.
#   python att.py B H T D DV
import time, torch, torch.nn.functional as F, sys
torch.manual_seed(0)
B,H,T,D,DV = [int(x) for x in sys.argv[1:6]]
scale = D ** -0.5
def flash(q,k,v, dt):
    vp = F.pad(v,(0,D-DV))
    return F.scaled_dot_product_attention(q.to(dt),k.to(dt),vp.to(dt),is_causal=True,scale=scale)[..., :DV].to(q.dtype)
mask = torch.ones(T,T,dtype=torch.bool).tril()
def math(q,k,v):
    s = (q @ k.transpose(-1,-2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1).to(v.dtype)
    return p @ v
cmath = torch.compile(math)
def bench(f, dt, n=8):
    q = torch.randn(B,H,T,D,dtype=dt,requires_grad=True); k = torch.randn(B,H,T,D,dtype=dt,requires_grad=True); v = torch.randn(B,H,T,DV,dtype=dt,requires_grad=True)
    g = torch.randn(B,H,T,DV,dtype=dt)
    ts=[]
    for i in range(n):
        t=time.perf_counter(); o=f(q,k,v); o.backward(g); ts.append(time.perf_counter()-t)
    return min(ts[2:])*1000
print("flash fp32", bench(lambda q,k,v: flash(q,k,v,torch.float32), torch.bfloat16))
print("flash bf16", bench(lambda q,k,v: flash(q,k,v,torch.bfloat16), torch.bfloat16))
print("math bf16 eager", bench(math, torch.bfloat16))
print("math bf16 compiled", bench(cmath, torch.bfloat16))
print("math fp32 compiled", bench(cmath, torch.float32))
