"""Run under torchrun (2 gloo ranks): the FSDP2 sharding that CUDA training uses (bf16 blocks, fp32
routers, fp32 gradient reduction), exercised on CPU with bf16 autocast, tied and untied heads.
Prints OK on rank 0."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nanoseek import Transformer  # noqa: E402
from nanoseek.train import dist  # noqa: E402

from helpers import tiny_config  # noqa: E402

torch.set_num_threads(1)
info = dist.init_distributed("cpu")
for tie in (False, True):
    torch.manual_seed(0)
    host = Transformer(tiny_config(num_nextn_predict_layers=1, tie_word_embeddings=tie))
    model = dist.shard_model(host, info, torch.device("cpu"), mixed_precision=True)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    seen = {}

    def record(key, tensor_of, seen=seen):
        return lambda module, args: seen.setdefault(key, tensor_of(module).dtype) and None

    model.layers[1].mlp.gate.register_forward_pre_hook(record("router", lambda m: m.weight))
    model.mtp[0].block.register_forward_pre_hook(
        record("block", lambda m: m.mlp.experts.gate_up_proj)
    )
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = host(x, x, 0.3).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x, 0.3).loss
    loss.backward()
    assert seen == {"router": torch.float32, "block": torch.bfloat16}, seen
    assert abs(loss.item() - reference) < 0.05, (loss.item(), reference)
    # sharded fp32 master weights and grads
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert dist.clip_grad_norm_(model.parameters(), 1.0) > 0
    optimizer.step()
    weights, _ = dist.full_state_dicts(model, optimizer)
    if info.is_main:
        host.load_state_dict(weights)
        assert (host.lm_head.weight is host.embed_tokens.weight) == tie
if info.is_main:
    print("OK")
dist.shutdown(info)
