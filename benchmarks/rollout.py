"""GRPO rollout throughput: the rollout engine as the GRPO trainer builds it (eager, a fresh engine
per rollout) against a compiled engine kept for the whole run (weights as graph inputs, each
update copied in; the prefix cache dropped with the old weights' latents).

The cpu preset's rollout shape: prompts_per_step prompts x group_size completions (one n=G request
per prompt, its prefill shared), temperature 1, max_new_tokens new tokens each. Every timed
rollout follows an in-place change of every weight (a stand-in for the optimizer step, not timed),
so the compiled engine pays for taking the new weights in at every rollout, as it would in GRPO.
Completions run to max_new_tokens (EOS ignored), so that each rollout does the same work. Prints
JSON lines: {"bench", "ours", "anchor", "ratio", "unit", "config", "cpu_flags", ...}.

    python benchmarks/rollout.py [--checkpoint DIR | --preset cpu] [--threads 1]
                                 [--prompts 8] [--group 16] [--new-tokens 64] [--prompt-len 40]
                                 [--rounds 3] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.compiled import CompiledRunner
from nanoseek.hostmem import tune_host_memory
from nanoseek.presets import load_preset
from nanoseek.train.precision import native_bf16


def cpu_flags() -> list[str]:
    """The vector extensions this CPU reports that decide which kernels pay."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [w for w in wanted if w in flags]


def rollout_engine(model: Transformer, prompts: int, group: int, seq_len: int) -> Engine:
    """The engine train/grpo_trainer.py builds for every rollout (eager, fresh)."""
    return Engine(
        model,
        None,
        max_batch_size=max(group, min(256, prompts * group)),
        max_model_len=seq_len,
        decode="eager",
    )


def nudge(model: Transformer, step: int) -> None:
    """Change every floating-point weight in place, as an optimizer step does."""
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.mul_(1.0 + 1e-4 * (torch.rand(p.shape, generator=gen) - 0.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a nanoseek checkpoint directory")
    src.add_argument("--preset", default="cpu", help="else this preset's model, random weights")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompts", type=int, default=None, help="default: the preset's")
    ap.add_argument("--group", type=int, default=None, help="default: the preset's")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: the preset's")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        help="the compiled engines' matrices (default: float32, and bfloat16 where native)",
    )
    args = ap.parse_args()
    tune_host_memory(huge_pages=False)  # as the nanoseek CLI does (nanoseek/hostmem.py)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = load_preset(args.preset or "cpu")
    grpo = preset["grpo"]
    P = args.prompts or grpo["prompts_per_step"]
    G = args.group or grpo["group_size"]
    n = args.new_tokens or grpo["max_new_tokens"]
    seq_len = grpo.get("seq_len", 256)
    if args.checkpoint:
        model = load_model(args.checkpoint).float()
        name = args.checkpoint
    else:
        model = Transformer(ModelConfig(**preset["model"]))
        name = f"the {args.preset} preset's model, random weights"
    model.eval()
    vocab = model.config.vocab_size
    conf = (
        f"{name}, CPU, threads={args.threads}, {P} prompts x group {G} = {P * G} sequences, "
        f"prompts of {args.prompt_len} tokens, temperature 1, {n} new tokens each (EOS ignored), "
        "every weight changed in place before each rollout"
    )

    def rollout(engine: Engine, step: int) -> int:
        rng = random.Random(step)  # new prompts every rollout, as GRPO draws them
        prompts = [[rng.randrange(2, vocab) for _ in range(args.prompt_len)] for _ in range(P)]
        params = [
            SamplingParams(n=G, max_tokens=n, temperature=1.0, ignore_eos=True, seed=step * P + i)
            for i in range(P)
        ]
        outs = engine.generate(prompts, params)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    dtypes = args.dtypes or ["float32"] + (["bfloat16"] if native_bf16(torch.device("cpu")) else [])
    kept = {}
    for dtype in dtypes:
        start = time.perf_counter()
        e = Engine(
            model,
            None,
            max_batch_size=max(G, min(256, P * G)),
            max_model_len=seq_len,
            decode="compiled",
            decode_dtype=dtype,
            decode_frozen=False,
        )
        rollout(e, 0)  # compiles the buckets a rollout meets
        print(
            f"# compiled {dtype} (weights as inputs): set-up and first rollout "
            f"{time.perf_counter() - start:.1f}s",
            file=sys.stderr,
        )
        kept[dtype] = e

    def fresh_eager(step: int) -> int:
        return rollout(rollout_engine(model, P, G, seq_len), step)

    runs = {"eager": fresh_eager}
    runs.update({f"compiled {d}": (lambda step, e=e: rollout(e, step)) for d, e in kept.items()})
    # in turns: every path once per round, after the same weight change
    best = dict.fromkeys(runs, float("inf"))
    tokens = {}
    step = 0
    for _ in range(args.rounds):
        for label, fn in runs.items():
            step += 1
            nudge(model, step)
            t = time.perf_counter()
            tokens[label] = fn(step)
            best[label] = min(best[label], time.perf_counter() - t)
    anchor = tokens["eager"] / best["eager"]
    for label in runs:
        if label == "eager":
            continue
        e = kept[label.split()[1]]
        compiled = isinstance(e.runner, CompiledRunner)
        ours = tokens[label] / best[label]
        print(
            json.dumps(
                dict(
                    bench=f"grpo_rollout_{label.replace(' ', '_')}_tokens_per_s",
                    ours=round(ours, 1),
                    anchor=round(anchor, 1),
                    ratio=round(ours / anchor, 2),
                    unit="generated tokens/s",
                    config=conf,
                    anchor_name="a fresh eager Engine per rollout (train/grpo_trainer.py today)",
                    ours_name=f"one {label} Engine for the run (decode_frozen=False)",
                    compiled=compiled,
                    compile_seconds={
                        f"{b}x{c}": round(s, 1)
                        for (b, c), s in getattr(e.runner, "compile_seconds", {}).items()
                    },
                    seconds_per_rollout={
                        "ours": round(best[label], 3),
                        "anchor": round(best["eager"], 3),
                    },
                    cpu_flags=cpu_flags(),
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
