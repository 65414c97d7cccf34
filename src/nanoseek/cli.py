"""`nanoseek <command>`: one entry point for every stage. Each command's --help says what it does."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_demo(args) -> int:
    from nanoseek.demo import run

    result = run(args.out, steps=args.steps, seed=args.seed)
    return 0 if result["continuation"] == result["expected"] else 1


def cmd_info(args) -> int:
    import torch

    from nanoseek import load_model
    from nanoseek.train.flops import active_matmul_params

    model = load_model(args.checkpoint)
    cfg = model.config
    dtype_bytes = torch.finfo(model.embed_tokens.weight.dtype).bits // 8
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
    info = {"parameters": model.num_parameters(), "active_parameters": model.num_parameters(active=True),
            "active_matmul_parameters": active_matmul_params(cfg), "layers": cfg.num_hidden_layers,
            "moe_layers": cfg.n_moe_layers, "experts": cfg.n_routed_experts, "experts_per_token":
            cfg.num_experts_per_tok, "mtp_modules": len(model.mtp), "dtype": str(model.embed_tokens.weight.dtype),
            "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(dtype_bytes),
            "expanded_mha_cache_bytes_per_token": mha, "context": cfg.max_position_embeddings}
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="A small, hackable DeepSeek-style LLM system.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a tiny MoE+MLA+MTP model on a counting task, save, reload, generate")
    p.add_argument("--out", default="runs/demo", help="checkpoint directory to write (default: runs/demo)")
    p.add_argument("--steps", type=int, default=80, help="training steps (default: 80)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="sizes of a checkpoint: parameters, active parameters, KV cache bytes per token")
    p.add_argument("checkpoint", help="a Hugging Face DeepseekV3 directory")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # ConfigError and CheckpointError included
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
