"""Training-step speed: nanoseek vs transformers' DeepseekV3ForCausalLM on
the same weights, and MoE vs dense.

Forward + backward + AdamW step on the reference config of the model issue, each side in fp32 and
under bf16 autocast (and compiled with --compile), its best taken; nanoseek under bf16 with the
attention kernel its trainer would choose here (`attention` in its lines; precision.py,
attention_kernel: timed once and cached); transformers with its fastest experts and attention
implementations in each precision (every pair timed first); the same AdamW kernel, the fastest
available, on both sides. MFU is against the matmul peak in the precision that ran (best of
512/1024/2048 square matmuls); `mfu_ceiling` says how much of nanoseek's best step its matrix
products and attention kernel take, and the MFU it would reach if nothing else took time.
Prints JSON lines: the CPU, the peaks, transformers' implementations, one line per variant, then
{"bench", "ours", "anchor", "ratio", "unit", ...}.

    python benchmarks/train_step.py [--batch 8] [--seq 256] [--steps 10] [--compile]
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
from nanoseek.train.flops import (
    active_matmul_params,
    attention_flops_per_token,
    measure_matmul_peak,
    train_flops_per_token,
)
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


def fastest_hf_implementation(
    path: str, ids: torch.Tensor, prec: str, steps: int = 3, skip: frozenset = frozenset()
) -> tuple[str, str, dict]:
    """transformers' fastest (experts, attention) implementations for this model here in `prec`
    (eager): each one timed (its best of `steps` steps after a warm one), a line printed for each.
    One whose first timed step takes over 3x the best so far is not timed further (`batched_mm`:
    ~40 s a step here); experts in `skip` are not timed at all. Chosen per precision: in fp32 eager
    experts can edge out grouped_mm, which under bf16, compiled, runs 1.4x faster than they do
    (2026-12-01, Zen 4). -> (experts, attention, {experts: its best tokens/s})."""
    best = None
    speeds: dict = {}
    for experts in HF_EXPERTS:
        if experts in skip:
            continue
        for attention in HF_ATTENTION:
            step = hf_step(load_hf(path, experts, attention).train(), ids, prec)
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
            print(json.dumps({**row, "precision": prec, "tokens_per_s": tps}), flush=True)
            speeds[experts] = max(speeds.get(experts, 0.0), tps)
            if best is None or tps > best[0]:
                best = (tps, experts, attention)
    return best[1], best[2], speeds


def time_variants(sides: dict, ids: torch.Tensor, steps: int, peaks: dict, flops: float) -> dict:
    """Every side's (precision, compiled) variants (sides: {name: (build, variants)}), each on a
    fresh copy of its side's weights from build(), timed round-robin (one step of each in turn,
    `steps` rounds, the best step kept), so that a machine whose load changes slows them alike.
    Prints a line each -> {side: its fastest variant's line, with that variant's "step" to run it
    again}."""
    kernels = {}  # nanoseek's attention under bf16, as its trainer chooses: timed before any
    for name, (build, variants) in sides.items():  # variant compiles (the timing resets Dynamo)
        for prec, compiled in variants:
            if name.startswith("nanoseek") and prec == "bf16":
                kernels[name, compiled] = precision.attention_kernel(
                    build(), ids.device, *ids.shape, compiled
                )[0]
    runs = []
    for name, (build, variants) in sides.items():
        for prec, compiled in variants:
            model = build().train()
            attention = kernels.get((name, compiled)) if prec == "bf16" else None
            if attention is not None:
                precision.set_attention_kernel(model, attention)
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
        run["tokens_per_s"] = tps
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
            best[run["name"]] = {**row, "step": run["step"]}
    return best


# What a step's kernels are, by the profiler's op names: the products (aten's, oneDNN's, the
# experts' grouped product runs aten::mm inside) and the fused attention kernel.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",)


def kernel_ceiling(step, steps: int = 3) -> dict:
    """Seconds per step in matrix products and in the fused attention kernel (self time, forward
    and backward, torch.profiler over `steps` steps; the unfused kernel's products count as matrix
    products), against the whole step's: the MFU the step would reach if everything else (norms,
    softmax, routing, casts, the optimizer) took no time at all."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - started) / steps
    seconds = {"matmul": 0.0, "attention": 0.0}
    for event in prof.key_averages():
        name = event.key
        if name in MATMUL_OPS or "mkldnn" in name and ("linear" in name or "matmul" in name):
            seconds["matmul"] += event.self_cpu_time_total / 1e6 / steps
        elif name.startswith(ATTENTION_OPS):
            seconds["attention"] += event.self_cpu_time_total / 1e6 / steps
    return {"step_s": wall, "matmul_s": seconds["matmul"], "attention_s": seconds["attention"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd variants (minutes each)"
    )
    ap.add_argument(
        "--no-anchor", action="store_true", help="skip transformers (when it is not installed)"
    )
    args = ap.parse_args()
    tune_host_memory(huge_pages=False)  # as the nanoseek CLI does (nanoseek/hostmem.py)
    # a dozen compiled variants, several of the same model class: past Dynamo's default limit (8)
    # a variant would silently run eagerly
    torch._dynamo.config.recompile_limit = 64
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
    sides = {"nanoseek": (lambda: copy.deepcopy(model), variants)}
    if not args.no_anchor:  # transformers with its fastest implementations in each precision
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp)
            slow: frozenset = frozenset()  # experts 10x behind the best (batched_mm): timed once
            for prec in precision.DTYPES:
                experts, attention, speeds = fastest_hf_implementation(tmp, ids, prec, skip=slow)
                slow |= {e for e, tps in speeds.items() if tps < max(speeds.values()) / 10}
                name = f"transformers[experts={experts},attention={attention}]"
                mine = [v for v in variants if v[0] == prec]
                if name in sides:
                    sides[name][1].extend(mine)
                else:
                    hf = load_hf(tmp, experts, attention)
                    sides[name] = ((lambda hf=hf: copy.deepcopy(hf)), mine)
    dense = Transformer(dense_twin(cfg))
    sides["nanoseek-dense"] = (lambda: copy.deepcopy(dense), variants)
    best = time_variants(sides, ids, args.steps, peaks, flops)
    steps = {name: row.pop("step") for name, row in best.items()}
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

    # How far MFU could go at these shapes: the best variant's products and attention kernel alone
    peak = peaks[ours["precision"]]
    kernels = kernel_ceiling(steps["nanoseek"])
    busy = kernels["matmul_s"] + kernels["attention_s"]
    # the FLOPs those products do: attention's are the fused kernel's, unless it ran unfused, whose
    # products compute the masked half of the scores too
    attention = attention_flops_per_token(cfg, args.seq)
    product_flops = flops - attention + (2 * attention if ours.get("attention") == "math" else 0)
    print(
        json.dumps(
            {
                "bench": "mfu_ceiling",
                "variant": {
                    k: v for k, v in ours.items() if k in ("precision", "compiled", "attention")
                },
                "config": conf,
                "step_ms": round(kernels["step_s"] * 1e3, 1),
                "matmul_ms": round(kernels["matmul_s"] * 1e3, 1),
                "fused_attention_ms": round(kernels["attention_s"] * 1e3, 1),
                "mfu_profiled_step": round(ids.numel() * flops / kernels["step_s"] / peak, 3),
                "mfu_if_only_these_kernels_ran": round(ids.numel() * flops / busy / peak, 3),
                "matmul_only_gflops": round(
                    ids.numel() * product_flops / kernels["matmul_s"] / 1e9,
                    1,
                ),
                "matmul_peak_gflops": round(peak / 1e9, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
