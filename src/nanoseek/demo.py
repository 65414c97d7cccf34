"""`nanoseek demo`: the whole model path in under a minute on a CPU, with no data to download.

A tiny MoE + MLA + MTP model learns to count (mod its vocabulary) from random starting points, with
the V3 bias balancing on; it is saved as a Hugging Face DeepseekV3 checkpoint, loaded back, and
continues a sequence greedily.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek import ModelConfig, Transformer, load_model, save_model

DEMO_CONFIG = dict(
    vocab_size=64,
    hidden_size=96,
    intermediate_size=192,
    moe_intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=64,
    num_nextn_predict_layers=1,
)


def counting_batch(batch: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    return (start + torch.arange(length + 1)) % vocab


@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def run(out: str | Path = "runs/demo", steps: int = 80, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(**DEMO_CONFIG)
    model = Transformer(cfg).train()
    print(
        f"model: {model.num_parameters() / 1e6:.2f} M parameters, "
        f"{model.num_parameters(active=True) / 1e6:.2f} M active per token; "
        f"latent KV cache {cfg.kv_cache_bytes_per_token(4)} B/token in fp32"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start, bar = time.perf_counter(), tqdm(range(steps), desc="train", unit="step")
    for _ in bar:
        seq = counting_batch(16, 32, cfg.vocab_size, gen)
        out_ = model.compute_loss(seq[:, :-1], seq[:, 1:])
        out_.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        load = model.expert_load()
        model.update_router_biases(1e-3)
        bar.set_postfix(
            loss=f"{out_.lm_loss.item():.3f}",
            mtp=f"{out_.mtp_loss.item():.3f}",
            load_max_over_mean=f"{(load.max(1).values / load.mean(1)).max().item():.2f}",
        )
    train_s = time.perf_counter() - start

    path = save_model(model, out)
    loaded = load_model(path)
    prompt = [40, 41, 42, 43]
    continuation = greedy(loaded, prompt, 12)
    expected = [(prompt[-1] + 1 + i) % cfg.vocab_size for i in range(12)]
    print(
        f"trained {steps} steps in {train_s:.1f}s; final loss {out_.lm_loss.item():.4f} "
        f"(uniform guess: {torch.log(torch.tensor(float(cfg.vocab_size))).item():.2f}), "
        f"MTP loss {out_.mtp_loss.item():.4f}"
    )
    print(f"saved a Hugging Face DeepseekV3 checkpoint to {path}/ and loaded it back")
    print(
        f"prompt {prompt} -> {continuation} "
        f"({'correct' if continuation == expected else 'not yet right'})"
    )
    return {
        "loss": out_.lm_loss.item(),
        "continuation": continuation,
        "expected": expected,
        "path": str(path),
    }
