"""Training-step speed: nanoseek vs transformers' DeepseekV3ForCausalLM on the same weights, and MoE vs dense.

Forward + backward + AdamW step, fp32, on the reference config of the model issue. Prints JSON lines:
{"bench", "ours", "anchor", "ratio", "unit", "config", ...}.

    python benchmarks/train_step.py [--batch 8] [--seq 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.train.flops import active_matmul_params, measure_matmul_peak, train_flops_per_token


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """All layers dense, with the width that gives the same active parameters per token as the MoE model."""
    moe_width = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    width = (cfg.first_k_dense_replace * cfg.intermediate_size + cfg.n_moe_layers * moe_width) \
        // cfg.num_hidden_layers
    return cfg.replace(first_k_dense_replace=cfg.num_hidden_layers, intermediate_size=width)


def time_steps(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def ours_step(model: Transformer, ids: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=True)
    targets = ids.roll(-1, 1)

    def step():
        loss = model.compute_loss(ids, targets).lm_loss  # the same objective transformers computes
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_step(model, ids: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=True)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-anchor", action="store_true", help="skip transformers (when it is not installed)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig()  # the reference config: ModelConfig's defaults
    tokens = args.batch * args.seq
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    peak = measure_matmul_peak()
    conf = f"reference, fp32, {args.batch}x{args.seq}, fwd+bwd+AdamW, threads={torch.get_num_threads()}"

    model = Transformer(cfg).train()
    ours = tokens / time_steps(ours_step(model, ids), args.steps)
    mfu = ours * train_flops_per_token(cfg, args.seq) / peak
    anchor = None
    if not args.no_anchor:
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
        anchor = tokens / time_steps(hf_step(hf, ids), args.steps)
    print(json.dumps({"bench": "train_step_tokens_per_s", "ours": round(ours, 1),
                      "anchor": anchor and round(anchor, 1), "ratio": anchor and round(ours / anchor, 2),
                      "unit": "tokens/s", "anchor_name": "transformers DeepseekV3ForCausalLM", "config": conf,
                      "mfu": round(mfu, 4), "matmul_peak_gflops": round(peak / 1e9, 1)}))

    dense_cfg = dense_twin(cfg)
    assert abs(active_matmul_params(dense_cfg) - active_matmul_params(cfg)) / active_matmul_params(cfg) < 0.01
    dense = Transformer(dense_cfg).train()
    dense_tps = tokens / time_steps(ours_step(dense, ids), args.steps)
    print(json.dumps({"bench": "moe_vs_dense_step_cost", "ours": round(dense_tps / ours, 3), "anchor": 1.0,
                      "ratio": round(dense_tps / ours, 3), "unit": "MoE step time / dense step time",
                      "config": conf + f", dense intermediate_size={dense_cfg.intermediate_size}",
                      "moe_tokens_per_s": round(ours, 1), "dense_tokens_per_s": round(dense_tps, 1),
                      "active_params": active_matmul_params(cfg)}))


if __name__ == "__main__":
    main()
