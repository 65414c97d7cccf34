"""Run under torchrun (2 gloo ranks): rank 1 fails while rank 0 waits in a collective; both leave
through `dist.shutdown` in a `finally`, as the stages do. The run must end, not hang."""

import torch

from nanoseek.train import dist

info = dist.init_distributed("cpu")
try:
    if info.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    torch.distributed.all_reduce(torch.ones(1))  # waits for a peer that never joins
finally:
    dist.shutdown(info)
