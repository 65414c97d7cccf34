"""Training-step speed: nanoseek vs transformers' DeepseekV3ForCausalLM on
the same weights, and MoE vs dense.

Forward + backward + AdamW step on the reference config of the model issue, each side in fp32 and
under bf16 autocast (and compiled with --compile), its best taken; nanoseek under bf16 with the
attention kernel's dtype its trainer would choose here (`attention` in its lines; precision.py,
attention_dtype: timed once and cached); transformers with its fastest
experts and attention implementations (each timed in fp32 first); the same AdamW kernel, the
fastest available, on both sides. MFU is against the matmul peak in the precision that ran (best
of 512/1024/2048 square matmuls). Prints JSON lines: the CPU, the peaks, transformers'
implementations, one line per variant, then {"bench", "ours", "anchor", "ratio", "unit", ...}.

    python benchmarks/train_step.py [--batch 8] [--seq 256] [--steps 5] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.hostmem import huge_pages_on, keep_freed_memory, tune_host_memory
from nanoseek.train import precision
from nanoseek.train.flops import active_matmul_params, measure_matmul_peak, train_flops_per_token
from nanoseek.train.optim import adamw_kernel

# transformers' own implementation choices for DeepseekV3: the fastest here is the anchor
HF_EXPERTS = ("grouped_mm", "batched_mm", "eager")
HF_ATTENTION = ("sdpa", "eager")


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """All layers dense, with the width that gives the same active
    parameters per token as the MoE model."""
    moe_width = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    width = (
        cfg.first_k_dense_replace * cfg.intermediate_size + cfg.n_moe_layers * moe_width
    ) // cfg.num_hidden_layers
    return cfg.replace(first_k_dense_replace=cfg.num_hidden_layers, intermediate_size=width)


def adamw(model) -> torch.optim.AdamW:
    """The same AdamW kernel for both sides: the fastest that runs here (the trainer's choice)."""
    params = list(model.parameters())
    return torch.optim.AdamW(params, lr=1e-4, **adamw_kernel(params))


def ours_step(model, ids: torch.Tensor, prec: str):
    opt = adamw(model)
    targets = ids.roll(-1, 1)
    cast = precision.autocast(ids.device, prec)

    def step():
        with cast:
            loss = model(ids, targets, 0.0).lm_loss  # the objective transformers computes: no MTP
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step(model, ids: torch.Tensor, prec: str):
    opt = adamw(model)
    cast = precision.autocast(ids.device, prec)

    def step():
        with cast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def load_hf(path: str, experts: str, attention: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation=experts, attn_implementation=attention
    )


def fastest_hf_implementation(path: str, ids: torch.Tensor, steps: int = 3) -> tuple[str, str]:
    """transformers' fastest (experts, attention) implementations for this model here: each one
    timed in fp32 (its best of `steps` steps after a warm one), a line printed for each. One whose
    first timed step takes over 3x the best so far is not timed further (`batched_mm`: ~40 s a
    step here)."""
    best = None
    for experts in HF_EXPERTS:
        for attention in HF_ATTENTION:
            step = hf_step(load_hf(path, experts, attention).train(), ids, "fp32")
            step()
            seconds = float("inf")
            for _ in range(steps):
                started = time.perf_counter()
                step()
                seconds = min(seconds, time.perf_counter() - started)
                if best is not None and seconds > 3 * ids.numel() / best[0]:
                    break
            tps = round(ids.numel() / seconds, 1)
            row = {"bench": "hf_implementation", "experts": experts, "attention": attention}
            print(json.dumps({**row, "precision": "fp32", "tokens_per_s": tps}), flush=True)
            if best is None or tps > best[0]:
                best = (tps, experts, attention)
    return best[1], best[2]


def time_variants(
    sides: dict, ids: torch.Tensor, variants, steps: int, peaks: dict, flops: float
) -> dict:
    """Every (side, precision, compiled) variant, each on a fresh copy of its side's weights from
    `sides[name]()`, timed round-robin (one step of each in turn, `steps` rounds, the best step
    kept), so that a machine whose load changes slows them alike. Prints a line each -> {side:
    its fastest variant's line}."""
    runs = []
    for name, build in sides.items():
        for prec, compiled in variants:
            model = build().train()
            attention = None
            if name.startswith("nanoseek") and prec == "bf16":  # as its trainer chooses
                attention = precision.attention_dtype(model, ids.device, *ids.shape)[0]
                precision.set_attention_dtype(model, attention)
            run = torch.compile(model) if compiled else model
            step = (ours_step if name.startswith("nanoseek") else hf_step)(run, ids, prec)
            started = time.perf_counter()
            try:
                step()  # compiles, when compiled
            except Exception as exc:  # noqa: BLE001 - a side that does not compile is reported, not fatal
                print(
                    json.dumps(
                        {
                            "bench": "train_step_variant",
                            "name": name,
                            "precision": prec,
                            "compiled": compiled,
                            "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                        }
                    )
                )
                continue
            first = time.perf_counter() - started
            step()  # warm
            runs.append(
                {
                    "name": name,
                    "precision": prec,
                    "compiled": compiled,
                    "attention": attention,
                    "step": step,
                    "first_step_s": round(first, 2),
                    "best_s": float("inf"),
                }
            )
    for _ in range(steps):
        for run in runs:
            started = time.perf_counter()
            run["step"]()
            run["best_s"] = min(run["best_s"], time.perf_counter() - started)
    best: dict = {}
    for run in runs:
        tps = ids.numel() / run["best_s"]
        row = {
            "bench": "train_step_variant",
            "name": run["name"],
            "precision": run["precision"],
            "compiled": run["compiled"],
            **({"attention": run["attention"]} if run["attention"] else {}),
            "tokens_per_s": round(tps, 1),
            "mfu": round(tps * flops / peaks[run["precision"]], 4),
            "first_step_s": run["first_step_s"],
        }
        print(json.dumps(row), flush=True)
        if run["name"] not in best or tps > best[run["name"]]["tokens_per_s"]:
            best[run["name"]] = row
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd variants (minutes each)"
    )
    ap.add_argument(
        "--no-anchor", action="store_true", help="skip transformers (when it is not installed)"
    )
    args = ap.parse_args()
    tune_host_memory(huge_pages=False)  # as the nanoseek CLI does (nanoseek/hostmem.py)
    torch.manual_seed(0)
    cfg = ModelConfig()  # the reference config: ModelConfig's defaults
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    print(
        json.dumps(
            {
                "bench": "cpu",
                **precision.cpu_summary(),
                "keep_freed_memory": keep_freed_memory(),
                "huge_pages": huge_pages_on(),
            }
        ),
        flush=True,
    )
    peaks = {p: 0.0 for p in precision.DTYPES}
    for _ in range(3):  # alternately, the best of each kept: a busy machine slows both alike
        for p, dtype in precision.DTYPES.items():
            peaks[p] = max(peaks[p], measure_matmul_peak("cpu", dtype, seconds=1.0))
    print(
        json.dumps(
            {
                "bench": "matmul_peak",
                "unit": "GFLOP/s",
                "sizes": [512, 1024, 2048],
                **{p: round(v / 1e9, 1) for p, v in peaks.items()},
            }
        ),
        flush=True,
    )
    variants = [(p, False) for p in precision.DTYPES] + (
        [(p, True) for p in precision.DTYPES] if args.compile else []
    )
    flops = train_flops_per_token(cfg, args.seq)
    conf = f"reference, {args.batch}x{args.seq}, fwd+bwd+AdamW, threads={torch.get_num_threads()}"

    model = Transformer(cfg)  # every variant of both sides starts from a copy of these weights
    sides = {"nanoseek": lambda: copy.deepcopy(model)}
    if not args.no_anchor:
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp)
            experts, attention = fastest_hf_implementation(tmp, ids)
            hf = load_hf(tmp, experts, attention)
        sides[f"transformers[experts={experts},attention={attention}]"] = lambda: copy.deepcopy(hf)
    dense = Transformer(dense_twin(cfg))
    sides["nanoseek-dense"] = lambda: copy.deepcopy(dense)
    best = time_variants(sides, ids, variants, args.steps, peaks, flops)
    ours = best["nanoseek"]
    anchors = [row for name, row in best.items() if name.startswith("transformers")]
    anchor = max(anchors, key=lambda row: row["tokens_per_s"]) if anchors else None
    print(
        json.dumps(
            {
                "bench": "train_step_tokens_per_s",
                "ours": ours["tokens_per_s"],
                "anchor": anchor and anchor["tokens_per_s"],
                "ratio": anchor and round(ours["tokens_per_s"] / anchor["tokens_per_s"], 2),
                "unit": "tokens/s",
                "anchor_name": anchor and f"{anchor['name']} DeepseekV3ForCausalLM",
                "config": conf,
                "ours_best": ours,
                "anchor_best": anchor,
                "mfu": ours["mfu"],
                "matmul_peak_gflops": round(peaks[ours["precision"]] / 1e9, 1),
            }
        ),
        flush=True,
    )

    dense_cfg = dense.config
    assert (
        abs(active_matmul_params(dense_cfg) - active_matmul_params(cfg)) / active_matmul_params(cfg)
        < 0.01
    )
    dense_tps = best["nanoseek-dense"]["tokens_per_s"]
    moe_tps = ours["tokens_per_s"]
    print(
        json.dumps(
            {
                "bench": "moe_vs_dense_step_cost",
                "ours": round(dense_tps / moe_tps, 3),
                "anchor": 1.0,
                "ratio": round(dense_tps / moe_tps, 3),
                "unit": "MoE step time / dense step time",
                "config": conf
                + f", each at its best, dense intermediate_size={dense_cfg.intermediate_size}",
                "moe_tokens_per_s": moe_tps,
                "dense_tokens_per_s": dense_tps,
                "active_params": active_matmul_params(cfg),
            }
        )
    )


if __name__ == "__main__":
    main()
