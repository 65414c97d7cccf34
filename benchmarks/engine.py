"""Inference speed: the nanoseek engine vs transformers' generate and llama.cpp on the same
weights, batching, cache size, int8, MTP speculation, and the compiled decode step (fp32, bf16 and
weight-only int8) against the eager one.

The reference config of the model issue, fp32, CPU. The model (with one MTP module) is first trained
for a few hundred steps on Python source bytes, so that greedy decoding is not noise and the MTP
head has something to predict; every figure below uses those same weights, in the same run. Prints
JSON lines: {"bench", "ours", "anchor", "ratio", "unit", "config", ...}.

    python benchmarks/engine.py [--threads 1] [--train-steps 300] [--train-batch 8]
                                [--train-seq 128] [--new-tokens 128] [--batch 16] [--no-anchor]
                                [--save-trained DIR | --checkpoint DIR] [--no-compiled]
                                [--no-llama-cpp] [--decode-only] [--concurrent-only]

The compiled rows print each graph's compile time (its package is cached on disk: a second run
with the same weights loads it in about a second). The llama.cpp rows export the same weights to
GGUF (f32, bf16, q8_0) and time llama.cpp with benchmarks/llama_cpp_anchor.py in a process of its
own, before and after nanoseek's paths; the concurrent-requests rows end with llama.cpp serving the
same requests at once (f32 and q8_0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.compiled import package_dir
from nanoseek.engine.quant import quantization_error, quantize_model
from nanoseek.engine.weights import MoEWeights
from nanoseek.hostmem import tune_host_memory
from nanoseek.train.precision import cpu_summary, native_bf16


def source_bytes(names: list[str]) -> torch.Tensor:
    """Token ids = the bytes of some standard-library modules (a
    corpus every Python install has)."""
    root = Path(argparse.__file__).parent
    return torch.tensor(list(b"".join((root / n).read_bytes() for n in names)), dtype=torch.long)


TRAIN = [
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "enum.py",
    "functools.py",
    "inspect.py",
    "pathlib.py",
    "shutil.py",
    "subprocess.py",
    "tarfile.py",
    "typing.py",
    "zipfile.py",
]
HELD_OUT = ["textwrap.py", "difflib.py"]


def train_briefly(
    model: Transformer, data: torch.Tensor, steps: int, batch: int = 8, seq: int = 256
) -> float:
    """AdamW on next-token + MTP loss; -> the last step's LM loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    loss = float("nan")
    for step in range(steps):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([data[s : s + seq + 1] for s in start])
        lr = (
            2e-3
            * min(1.0, (step + 1) / 30)
            * (0.1 + 0.9 * (1 + math.cos(math.pi * step / steps)) / 2)
        )
        for group in opt.param_groups:
            group["lr"] = lr
        out = model.compute_loss(chunk[:, :-1], chunk[:, 1:], mtp_weight=0.3)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases(1e-3)
        loss = out.lm_loss.item()
    return loss


def measure(runs: dict, rounds: int = 3) -> dict:
    """Time the callables of `runs` in turns (one warm-up, then `rounds` rounds, each
    running every callable once), so that a shared machine's changing load hits them alike.
    -> name -> (best wall s, best CPU s, last result). Everything runs in this one process
    and thread count, so CPU time is comparable too."""
    results = {name: fn() for name, fn in runs.items()}
    wall, cpu = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            w, c = time.perf_counter(), time.process_time()
            results[name] = fn()
            wall[name] = min(wall[name], time.perf_counter() - w)
            cpu[name] = min(cpu[name], time.process_time() - c)
    return {name: (wall[name], cpu[name], results[name]) for name in runs}


def speeds(tokens: int, ours, anchor) -> dict:
    """A JSON row's numbers: tokens/s of both (wall clock), their
    ratio, and the ratio in CPU time."""
    return dict(
        ours=round(tokens / ours[0], 1),
        anchor=round(tokens / anchor[0], 1),
        ratio=round(anchor[0] / ours[0], 2),
        cpu_time_ratio=round(anchor[1] / ours[1], 2),
    )


def matmul_floor(engine: Engine, batch: int = 1, steps: int = 64) -> tuple[float, int]:
    """What a decode step of `batch` sequences costs if it did nothing but its matrix products:
    every matmul the tokens need in the engine's own weight layout (attention projections, the
    absorbed W_UK / W_UV products, dense FFN, router, shared expert, routed experts, LM head), with
    no attention scores, norms, routing or Python around them. The routed experts get an even share
    of the batch's batch * top_k rows. No eager fp32 engine here can beat it. -> (seconds per step,
    weight bytes read per step)."""
    w = engine.runner.weights.current()
    # (rows, matrix): [in, out] matrices, or [H, in, out] stacks (a batched product over heads)
    prods = []
    for layer, block in enumerate(w.blocks[: len(engine.model.layers)]):
        a, ffn = block.attn, block.ffn
        prods += [(batch, m) for m in (a.proj_in.w_t, a.proj_q.w_t, a.w_uk, a.w_uv_t, a.o_proj.w_t)]
        if isinstance(ffn, MoEWeights):
            pairs, E = batch * ffn.router.gate.top_k, ffn.n_experts
            # different ones in each layer
            experts = [(layer * pairs + k) % E for k in range(min(pairs, E))]
            prods += [
                (batch, ffn.router.w_t),
                (batch, ffn.shared.gate_up.w_t),
                (batch, ffn.shared.down.w_t),
            ]
            prods += [(-(-pairs // len(experts)), m) for e in experts for m in ffn.each[e]]
        else:
            prods += [(batch, ffn.gate_up.w_t), (batch, ffn.down.w_t)]
    prods.append((batch, w.lm_head.w_t))
    calls = [
        (torch.bmm if m.dim() == 3 else torch.mm, torch.randn(*m.shape[:-2], rows, m.shape[-2]), m)
        for rows, m in prods
    ]

    def step():
        for op, x, m in calls:
            op(x, m)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps, sum(
        m.numel() * m.element_size() for _, m in prods
    )


def compiled_decode(
    model: Transformer,
    prompt: list[int],
    greedy: SamplingParams,
    conf: str,
    eager: Engine,
    anchor=None,
) -> dict:
    """Batch-1 decode through Engine.generate: the compiled step in fp32, bf16 and int8 (each
    forced, whatever this CPU would pick) against the eager engine and transformers, timed in
    turns. -> the compiled engines, by dtype."""
    n = greedy.max_tokens
    engines = {}
    for dtype in ("float32", "bfloat16", "int8"):
        start = time.perf_counter()
        engines[dtype] = Engine(model, max_batch_size=1, decode="compiled", decode_dtype=dtype)
        engines[dtype].generate([prompt], greedy)  # compiles every bucket the generation meets
        print(
            f"# compiled {dtype}: set-up and first generation {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
        )
    runs = {
        name: (lambda e=e: e.generate([prompt], greedy)[0].token_ids) for name, e in engines.items()
    }
    runs["eager"] = lambda: eager.generate([prompt], greedy)[0].token_ids
    if anchor is not None:
        runs["anchor"] = anchor
    m = measure(runs)
    for dtype, e in engines.items():
        seconds = getattr(e.runner, "compile_seconds", {})  # none: it fell back to eager
        row = dict(
            bench=f"decode_batch1_compiled_{dtype}_tokens_per_s",
            **speeds(n, m[dtype], m["eager"]),
            unit="tokens/s",
            config=conf + f", prompt {len(prompt)}, {n} new tokens, greedy, vs eager",
            anchor_name="the eager engine",
            same_tokens_as_eager=m[dtype][2] == m["eager"][2],
            compiled=hasattr(e.runner, "compile_seconds"),
            compile_seconds={f"{b}x{c or 'any'}": round(t, 1) for (b, c), t in seconds.items()},
        )
        if "anchor" in m:
            row.update(vs_transformers=speeds(n, m[dtype], m["anchor"]))
        emit(**row)
    print(f"# the compiled graphs' cache: {package_dir()}", file=sys.stderr)
    return engines


def concurrent(
    model: Transformer,
    eager: Engine,
    prompts: list[list[int]],
    greedy: SamplingParams,
    batch: int,
    conf: str,
    with_compiled: bool = True,
) -> dict:
    """len(prompts) requests at once against the same engine at batch 1, for the eager engine
    and the compiled step (fp32, int8, and bf16 where this CPU has it natively), each engine with
    max_batch_size=batch. The compiled engines compile their batch-1 and batch-`batch` buckets
    in the warm-up round (not timed). -> engine name -> (total tokens/s of the batch, tokens/s
    of one request alone)."""
    n = greedy.max_tokens
    totals = {}
    engines = {"eager": eager}
    if with_compiled:
        bf16 = ["bfloat16"] if native_bf16(torch.device("cpu")) else []
        for dtype in ["float32", "int8"] + bf16:
            engines[f"compiled {dtype}"] = Engine(
                model, max_batch_size=batch, decode="compiled", decode_dtype=dtype
            )
    for name, engine in engines.items():
        m = measure(
            {
                "batch": lambda e=engine: e.generate(prompts, greedy),
                "one": lambda e=engine: e.generate([prompts[0]], greedy),
            },
            rounds=5,  # cheap (under 1 s a round) and this VM is noisy
        )
        per_request = (m["batch"][0] / len(prompts), m["batch"][1] / len(prompts))
        totals[name] = (n / per_request[0], n / m["one"][0])
        row = dict(
            bench=f"throughput_{len(prompts)}_concurrent"
            + ("" if name == "eager" else "_" + name.replace(" ", "_")),
            **speeds(n, per_request, m["one"]),
            unit="tokens/s",
            config=conf + f", {len(prompts)} requests x {n} tokens vs the same engine ({name}) at "
            "batch 1; ours: total tokens/s of the batch",
            same_tokens_as_alone=m["batch"][2][0].outputs[0].token_ids
            == m["one"][2][0].outputs[0].token_ids,
        )
        if name == "eager":
            floor_batch = min(matmul_floor(engine, len(prompts))[0] for _ in range(3))
            row.update(matmul_floor_tokens_per_s=round(len(prompts) / floor_batch, 1))
        else:
            seconds = getattr(engine.runner, "compile_seconds", {})  # none: it fell back to eager
            row.update(
                compiled=hasattr(engine.runner, "compile_seconds"),
                compile_seconds={f"{b}x{c or 'any'}": round(t, 1) for (b, c), t in seconds.items()},
            )
        emit(**row)
    return totals


def llama_cpp_concurrent_rows(
    model: Transformer, totals: dict, prompts: list[list[int]], n: int, conf: str, threads: int
) -> None:
    """The same requests' shape in llama.cpp on the same weights (GGUF f32 and q8_0): that many
    sequences at once (`llama_cpp_anchor.py --sequences`, in a process of its own) against
    nanoseek's compiled fp32 and int8 totals; each row also gives both libraries' own gain from
    batching (the batch's total over one request alone)."""
    from llama_cpp_anchor import export_for_llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        ggufs = export_for_llama_cpp(model, Path(tmp), ("f32", "q8_0"))
        for ours, gguf_type in (("compiled float32", "f32"), ("compiled int8", "q8_0")):
            if ours not in totals:
                continue
            anchor = llama_cpp(
                ggufs[gguf_type], threads, len(prompts[0]), n, sequences=len(prompts)
            )
            emit(
                bench=f"throughput_{len(prompts)}_concurrent_vs_llama_cpp_{gguf_type}",
                ours=round(totals[ours][0], 1),
                anchor=round(anchor["parallel_tok_s"], 1),
                ratio=round(totals[ours][0] / anchor["parallel_tok_s"], 2),
                unit="tokens/s",
                config=conf + f", {len(prompts)} requests x {n} tokens, prompts of "
                f"{len(prompts[0])}, total tokens/s of the batch, nanoseek {ours} vs GGUF "
                f"{gguf_type} ({len(prompts)} sequences in one llama_decode batch per step)",
                anchor_name="llama.cpp (llama-cpp-python 0.3.36, a llama_decode loop)",
                ours_gain_over_one_request=round(totals[ours][0] / totals[ours][1], 2),
                llama_cpp_gain_over_one_request=round(
                    anchor["parallel_tok_s"] / anchor["one_request_tok_s"], 2
                ),
            )


def forced_logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """Teacher forcing through the engine: prompt tokens[0], then every next token of `tokens`
    whatever the logits say. -> the logit rows that predicted tokens[1:] [len - 1, V]."""
    rows = []

    def forcing(logits, sample_rows):
        rows.append(logits[0].float().clone())
        return [tokens[len(sample_rows[0].token_ids)]]

    sample = engine.sampler.sample
    engine.sampler.sample = forcing
    try:
        engine.generate([tokens[:1]], SamplingParams(max_tokens=len(tokens) - 1, ignore_eos=True))
    finally:
        engine.sampler.sample = sample
    return torch.stack(rows)


def compiled_quality(engines: dict, eager: Engine, held_out: torch.Tensor, conf: str) -> None:
    """Each compiled path's logits against the eager engine's on held-out bytes, teacher-forced
    through Engine.generate: the largest error and the perplexity change."""
    windows = [held_out[i * 1000 : i * 1000 + 200].tolist() for i in range(4)]  # one 256 bucket
    reference = [forced_logits(eager, w) for w in windows]
    targets = torch.cat([torch.tensor(w[1:]) for w in windows])

    def perplexity(logits: list[torch.Tensor]) -> float:
        return torch.nn.functional.cross_entropy(torch.cat(logits), targets).exp().item()

    ppl_ref = perplexity(reference)
    for dtype, e in engines.items():
        got = [forced_logits(e, w) for w in windows]
        errors = torch.cat([(g - r).abs().amax(-1) for g, r in zip(got, reference)])
        ppl = perplexity(got)
        emit(
            bench=f"decode_compiled_{dtype}_quality",
            unit="logits",
            config=conf + f", {len(targets)} held-out bytes teacher-forced, vs the eager engine",
            max_logit_error=float(f"{errors.max().item():.3g}"),
            median_row_error=float(f"{errors.median().item():.3g}"),
            perplexity_eager=round(ppl_ref, 4),
            perplexity=round(ppl, 4),
            perplexity_change=float(f"{ppl / ppl_ref - 1:.3g}"),
        )


def llama_cpp(
    gguf: Path, threads: int, prompt: int, new: int, depth: int = 0, sequences: int = 1
) -> dict:
    """llama.cpp's figures from benchmarks/llama_cpp_anchor.py, in a process of its own (so that
    neither library's thread pool waits on the other's); sequences > 1: that many requests at
    once against one alone (its --sequences)."""
    cmd = [sys.executable, str(Path(__file__).with_name("llama_cpp_anchor.py")), str(gguf)]
    cmd += ["--threads", str(threads), "--prompt", str(prompt), "--new", str(new)]
    cmd += ["--depth", str(depth), "--sequences", str(sequences)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_cpp_rows(
    model: Transformer, engines: dict, prompt: list[int], n: int, conf: str, threads: int
):
    """The same weights in llama.cpp (GGUF f32, bf16, q8_0 exported by nanoseek), timed as
    llama-bench times them, before and after nanoseek's own paths (best of both, so that a
    drifting load favours neither). engines: name -> Engine (batch 1)."""
    from llama_cpp_anchor import export_for_llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        ggufs = export_for_llama_cpp(model, Path(tmp), ("f32", "bf16", "q8_0"))

        def anchor() -> dict:
            return {t: llama_cpp(g, threads, 256, n, len(prompt)) for t, g in ggufs.items()}

        before = anchor()
        greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        runs = {k: (lambda e=e: e.generate([prompt], greedy)) for k, e in engines.items()}
        # the prompt's prefill and first token alone: llama-bench's decode figure (tg) leaves
        # the prompt out (its -d context is filled untimed), so ours counts the n - 1 decode
        # steps that follow it: (generate of n tokens - generate of 1) / (n - 1)
        runs |= {(k, 1): (lambda e=e: e.generate([prompt], one)) for k, e in engines.items()}
        decode = measure(runs)
        # a fresh 256-token prompt each time: a repeated one would hit the prefix cache
        fresh = itertools.count()

        def prefill_once(e: Engine):
            rng = random.Random(next(fresh))
            vocab = model.config.vocab_size
            return e.generate([[rng.randrange(vocab) for _ in range(256)]], one)

        prefill = measure({k: (lambda e=e: prefill_once(e)) for k, e in engines.items()})
        after = anchor()
    best = {
        t: {key: max(before[t][key], after[t][key]) for key in ("prefill_tok_s", "decode_tok_s")}
        for t in ggufs
    }
    ours = {k: (n - 1) / (decode[k][0] - decode[k, 1][0]) for k in engines}
    with_prompt = {k: round(n / decode[k][0], 1) for k in engines}
    ours_prefill = {k: 256 / prefill[k][0] for k in engines}
    fastest = max(ours, key=ours.get)
    anchor_fastest = max(("bf16", "q8_0"), key=lambda t: best[t]["decode_tok_s"])
    setting = (
        f", prompt {len(prompt)} (llama.cpp: depth {len(prompt)}), {n} new tokens, greedy; ours: "
        f"the {n - 1} decode steps after the prompt's step, through Engine.generate"
    )
    name = "llama.cpp (llama-cpp-python 0.3.36, a llama_decode loop as llama-bench times it)"
    # fp32 as the Engine's default (auto) runs it on this CPU: compiled, when the run has it
    f32 = "compiled float32" if "compiled float32" in ours else "eager float32"
    emit(
        bench="decode_batch1_vs_llama_cpp_f32",
        ours=round(ours[f32], 1),
        anchor=round(best["f32"]["decode_tok_s"], 1),
        ratio=round(ours[f32] / best["f32"]["decode_tok_s"], 2),
        unit="tokens/s",
        config=conf + setting + f", nanoseek {f32} vs GGUF f32",
        anchor_name=name,
        every_path={k: round(v, 1) for k, v in ours.items()},
        generate_with_prompt=with_prompt,
    )
    emit(
        bench="decode_batch1_fastest_vs_llama_cpp_fastest",
        ours=round(ours[fastest], 1),
        anchor=round(best[anchor_fastest]["decode_tok_s"], 1),
        ratio=round(ours[fastest] / best[anchor_fastest]["decode_tok_s"], 2),
        unit="tokens/s",
        config=conf + setting + f", nanoseek {fastest} vs GGUF {anchor_fastest}",
        anchor_name=name,
        llama_cpp={t: round(b["decode_tok_s"], 1) for t, b in best.items()},
    )
    for ours_path, gguf_type in (("eager float32", "f32"), (fastest, anchor_fastest)):
        emit(
            bench=f"prefill_256_vs_llama_cpp_{gguf_type}",
            ours=round(ours_prefill[ours_path], 1),
            anchor=round(best[gguf_type]["prefill_tok_s"], 1),
            ratio=round(ours_prefill[ours_path] / best[gguf_type]["prefill_tok_s"], 2),
            unit="tokens/s",
            config=conf + f", a 256-token prompt, nanoseek {ours_path} (prefill and one sampled "
            f"token) vs llama.cpp GGUF {gguf_type} (one batch of 256)",
            anchor_name=name,
        )


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-anchor", action="store_true", help="skip transformers")
    ap.add_argument(
        "--checkpoint",
        help="measure this checkpoint (reference-sized, with MTP) instead of training one",
    )
    ap.add_argument(
        "--save-trained", help="save the briefly trained model here (to measure it again later)"
    )
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled decode step")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp anchor")
    ap.add_argument("--decode-only", action="store_true", help="stop after the batch-1 decode rows")
    ap.add_argument(
        "--concurrent-only",
        action="store_true",
        help="only the concurrent-requests rows (eager and compiled), then stop",
    )
    args = ap.parse_args()
    tune_host_memory(huge_pages=True)  # as the nanoseek CLI does (nanoseek/hostmem.py)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    emit(bench="cpu", **cpu_summary())  # which CPU the figures come from
    n = args.new_tokens
    data, held_out = source_bytes(TRAIN), source_bytes(HELD_OUT)
    if args.checkpoint:
        model = load_model(args.checkpoint).float()
        conf = f"{args.checkpoint}, fp32, CPU, threads={args.threads}"
    else:
        # the reference config: ModelConfig's defaults, plus one MTP module
        model = Transformer(ModelConfig(num_nextn_predict_layers=1))
        conf = (
            f"reference + 1 MTP module, fp32, CPU, threads={args.threads}, trained "
            f"{args.train_steps} steps of {args.train_batch}x{args.train_seq} source bytes"
        )
        t0 = time.perf_counter()
        loss = (
            train_briefly(model, data, args.train_steps, args.train_batch, args.train_seq)
            if args.train_steps
            else float("nan")
        )
        print(
            f"# trained {args.train_steps} steps in "
            f"{time.perf_counter() - t0:.0f}s, lm loss {loss:.3f}",
            file=sys.stderr,
        )
        if args.save_trained:
            save_model(model, args.save_trained)
    model.eval()
    cfg = model.config

    prompts = [held_out[i * 997 : i * 997 + 32].tolist() for i in range(args.batch)]
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    # the eager engine, the reference of every row (the Engine's default is "auto")
    engine = Engine(model, max_batch_size=args.batch, decode="eager")

    def many_requests() -> None:
        totals = concurrent(model, engine, prompts, greedy, args.batch, conf, not args.no_compiled)
        if not args.no_llama_cpp:
            try:
                llama_cpp_concurrent_rows(model, totals, prompts, n, conf, args.threads)
            except ImportError:
                print("# llama-cpp-python is not installed: no llama.cpp rows", file=sys.stderr)

    if args.concurrent_only:
        many_requests()
        return

    # 1. decode at batch 1: engine vs transformers' generate
    runs = {"ours": lambda: engine.generate([prompts[0]], greedy)[0].token_ids}
    if not args.no_anchor:
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = torch.tensor([prompts[0]])

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(
                    ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )
            return out[0, ids.shape[1] :].tolist()

        runs["anchor"] = hf_generate
    m = measure(runs)
    row = dict(
        bench="decode_batch1_tokens_per_s",
        ours=round(n / m["ours"][0], 1),
        anchor=None,
        ratio=None,
        unit="tokens/s",
        config=conf + f", prompt 32, {n} new tokens, greedy",
        anchor_name="transformers AutoModelForCausalLM.generate (greedy)",
    )
    if "anchor" in m:
        row.update(speeds(n, m["ours"], m["anchor"]), same_tokens=m["anchor"][2] == m["ours"][2])
    floor, weight_bytes = min(matmul_floor(engine) for _ in range(3))
    row.update(matmul_floor_tokens_per_s=round(1 / floor, 1), weight_bytes_per_token=weight_bytes)
    emit(**row)
    reference_tokens = m["ours"][2]
    if not args.no_compiled:
        engines = compiled_decode(model, prompts[0], greedy, conf, engine, runs.get("anchor"))
        compiled_quality(engines, engine, held_out, conf)
    if not args.no_llama_cpp:
        paths = {"eager float32": engine}
        if not args.no_compiled:
            paths.update({f"compiled {dtype}": e for dtype, e in engines.items()})
        paths["eager int8"] = Engine(quantize_model(model), max_batch_size=1, decode="eager")
        try:
            llama_cpp_rows(model, paths, prompts[0], n, conf, args.threads)
        except ImportError:
            print("# llama-cpp-python is not installed: no llama.cpp rows", file=sys.stderr)
    if args.decode_only:
        return

    # 2. many requests at once vs one at a time, same engine (eager, and compiled), and llama.cpp
    many_requests()

    # 3. cache bytes per token
    fp = 4
    latent = engine.cache_bytes_per_token
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * fp
    emit(
        bench="kv_cache_bytes_per_token",
        ours=latent,
        anchor=mha,
        ratio=round(mha / latent, 2),
        unit="bytes",
        config=f"fp32, (kv_lora_rank {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}) x "
        f"{cfg.num_hidden_layers} layers x 4 B, vs an expanded MHA cache (K and V per head)",
        formula_bytes=(cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * fp,
    )

    # 4. int8 weights: speed and quality
    q = quantize_model(model)
    q_engine = Engine(q, max_batch_size=1, decode="eager")
    fp_engine = Engine(model, max_batch_size=1, decode="eager")
    m = measure(
        {
            "int8": lambda: q_engine.generate([prompts[0]], greedy)[0].token_ids,
            "fp32": lambda: fp_engine.generate([prompts[0]], greedy)[0].token_ids,
        }
    )
    quality = quantization_error(model, q, held_out[: 16 * 256].view(16, 256))
    emit(
        bench="int8_decode_tokens_per_s",
        **speeds(n, m["int8"], m["fp32"]),
        unit="tokens/s",
        config=conf + ", int8 weight-only vs fp32, batch 1, greedy",
        max_logit_error=round(quality["max_logit_error"], 4),
        mean_logit_error=round(quality["mean_logit_error"], 5),
        perplexity_fp=round(quality["perplexity_fp"], 4),
        perplexity_int8=round(quality["perplexity_int8"], 4),
        perplexity_change=round(quality["perplexity_change"], 5),
        weight_bytes_fp=quality["weight_bytes_fp"],
        weight_bytes_int8=quality["weight_bytes_int8"],
        held_out_tokens=quality["tokens"],
    )

    # 5. MTP speculative decoding vs plain, batch 1, greedy; and its ceiling here: the MTP module
    # run as usual but its draft replaced by the right token (read off the plain
    # greedy output), so every draft is accepted
    spec = Engine(model, max_batch_size=1, speculative=True, decode="eager")
    oracle = Engine(model, max_batch_size=1, speculative=True, decode="eager")
    mtp_draft = oracle.spec.draft

    def right_draft(runner, inp, hidden, next_ids, rows):
        mtp_draft(runner, inp, hidden, next_ids, rows)  # keep the MTP block's cost
        k = len(oracle.scheduler.running[0].token_ids) - len(prompts[0])
        return [reference_tokens[k] if k < n else 0]

    oracle.spec.draft = right_draft
    m = measure(
        {
            "spec": lambda: spec.generate([prompts[0]], greedy)[0].token_ids,
            "oracle": lambda: oracle.generate([prompts[0]], greedy)[0].token_ids,
            "plain": lambda: fp_engine.generate([prompts[0]], greedy)[0].token_ids,
        }
    )
    emit(
        bench="speculative_decode_tokens_per_s",
        **speeds(n, m["spec"], m["plain"]),
        unit="tokens/s",
        config=conf + ", MTP draft (1 token) vs plain, batch 1, greedy",
        acceptance_rate=round(spec.stats()["spec_acceptance_rate"], 3),
        same_tokens=m["spec"][2] == reference_tokens,
    )
    emit(
        bench="speculative_ceiling_tokens_per_s",
        **speeds(n, m["oracle"], m["plain"]),
        unit="tokens/s",
        config=conf + ", MTP drafts replaced by the right token: "
        "the cost of verifying 2 tokens on this machine",
        acceptance_rate=round(oracle.stats()["spec_acceptance_rate"], 3),
        same_tokens=m["oracle"][2] == reference_tokens,
    )


if __name__ == "__main__":
    main()
