"""The compiled decode step (engine/compiled.py) and the experts gathered by id (model/moe.py)
against the eager engine and a full recompute: teacher-forced logits at every position, with
batching, paging and the prefix cache on, past the YaRN config's original context. Fast tests run
the decode graph uncompiled (its math, fp32 and bf16); the slow ones compile it for real (40-100 s
per graph on a busy 2-core machine)."""

from __future__ import annotations

import os
import time
import warnings
import zipfile
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from nanoseek.engine import Engine, SamplingParams, kernels
from nanoseek.engine import compiled as compiled_mod
from nanoseek.engine.compiled import CompiledRunner, bucket, compiler_missing
from nanoseek.engine.quant import quantize_model
from nanoseek.engine.runner import ModelRunner
from nanoseek.engine.weights import InferenceWeights
from nanoseek.model import moe

from helpers import one_thread, tiny_model  # noqa: F401

# fp32: the graph computes the same sums in another order (and Inductor fuses them
# differently again), so its logits differ from the eager engine's and the recompute's by
# rounding only; measured under 2e-5 here.
FP32_TOL = 1e-4
# bf16 matrices and activations: about 3 significant digits per product. Most rows stay within
# BF16_TOL (the median error is ~0.1 on logits of magnitude ~7 here), but routing is discrete: a
# bf16-rounded hidden state can pick another expert, and with this tiny model's 10x-scale weights
# that moves a row by several logits. So bf16 is held to BF16_TOL on at least BF16_WITHIN of the
# rows (0.82 measured), and to greedy agreement on those.
BF16_TOL = 0.15
BF16_WITHIN = 0.7
# int8 (weight-only dense products, LM head and experts, on top of bf16): each of those matrices
# rounded to 1/127 of its rows' largest weight moves the logits about twice as much as bf16 alone
# (median ~0.16 here; 84-93% of the rows within 0.3); held like bf16, to INT8_TOL on INT8_WITHIN
# of the rows
INT8_TOL = 0.3
INT8_WITHIN = 0.7
PATHS = [
    ("float32", FP32_TOL, 1.0),
    ("bfloat16", BF16_TOL, BF16_WITHIN),
    ("int8", INT8_TOL, INT8_WITHIN),
]
YARN = dict(
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    max_position_embeddings=128,
)
NEW_TOKENS = 40  # prompts of 12-20 tokens: positions reach 60, past the original 32


def prompts() -> list[list[int]]:
    shared = [3, 17, 42, 5, 9, 11, 23, 7]  # two blocks of 4: the prefix cache serves them again
    return [
        shared + [60, 61, 62, 63],
        shared + [70, 71, 72, 73, 74, 75, 76],
        [90, 91, 92] + shared[:2] * 6,
    ]


def forced_tokens(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, 128, (n,), generator=gen).tolist() for _ in prompts()]


def teacher_forced(engine: Engine, rounds: int = 2) -> dict[tuple[int, int], torch.Tensor]:
    """Run every prompt with its forced continuation (the sampler returns it, whatever the logits
    say), all batched, `rounds` times (later rounds hit the prefix cache). -> (prompt, k) -> the
    logit row that predicts continuation token k, from the last round."""
    ps, forced = prompts(), forced_tokens(NEW_TOKENS)
    index = {tuple(p): i for i, p in enumerate(ps)}
    record = {}

    def forcing(logits, rows):
        tokens = []
        for row, lg in zip(rows, logits):
            i = index[tuple(row.token_ids[: row.num_prompt])]
            k = len(row.token_ids) - row.num_prompt
            record[(i, k)] = lg.float().clone()
            tokens.append(forced[i][k])
        return tokens

    engine.sampler.sample = forcing
    for _ in range(rounds):
        engine.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return record


@torch.no_grad()
def recomputed(model) -> dict[tuple[int, int], torch.Tensor]:
    """The same rows from one full forward of each prompt + its forced continuation."""
    out = {}
    for i, (p, f) in enumerate(zip(prompts(), forced_tokens(NEW_TOKENS))):
        logits = model(torch.tensor([p + f]))[0].float()
        for k in range(NEW_TOKENS):
            out[(i, k)] = logits[len(p) - 1 + k]
    return out


def compare(got: dict, want: dict, tol: float, within: float = 1.0) -> float:
    """At least `within` of the rows (all, by default) within tol (max abs); on those, the top-1
    token equal wherever the reference's top-1 margin exceeds 2 * tol (a smaller margin can flip by
    rounding alone). -> the fraction of rows within tol."""
    assert got.keys() == want.keys()
    close = 0
    for key, ref in want.items():
        err = (got[key] - ref).abs().max().item()
        if within == 1.0:
            assert err <= tol, f"logits of {key} differ by {err:.2e} > {tol:.0e}"
        if err > tol:
            continue
        close += 1
        top2 = ref.topk(2)
        if (top2.values[0] - top2.values[1]).item() > 2 * tol:
            assert got[key].argmax().item() == top2.indices[0].item(), key
    assert close >= within * len(want), f"{close} of {len(want)} rows within {tol}"
    return close / len(want)


def engine(model, **kw) -> Engine:
    return Engine(model, max_batch_size=4, block_size=4, num_blocks=96, **kw)


@pytest.fixture(autouse=True)
def _packages(monkeypatch, tmp_path):
    """Each test's AOTInductor packages in a folder of its own, never the user's cache."""
    monkeypatch.setattr(compiled_mod, "package_dir", lambda: str(tmp_path / "packages"))


def uncompiled(monkeypatch) -> list[str]:
    """Run the decode graph as a plain module: the same math, none of the compile time. On the
    ahead-of-time path (frozen weights, compiled.COMPILER "aot") a package is a small zip naming
    the graph it stands for, loaded as that graph's forward: the cache's files, names and checks
    stay real. -> the packages "compiled" (paths), in order."""
    monkeypatch.setattr(compiled_mod.torch, "compile", lambda graph, **kw: graph)
    graphs = {}
    compiles = []

    def compile_package(self, args, path):
        graphs[str(id(self.graph))] = self.graph
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("graph", f"{id(self.graph)}")
        compiles.append(path)

    def load_package(path):
        with zipfile.ZipFile(path) as z:
            graph = graphs[z.read("graph").decode()]
        return SimpleNamespace(loader=SimpleNamespace(run=lambda inputs: list(graph(*inputs))))

    monkeypatch.setattr(compiled_mod._Packaged, "_compile", compile_package)
    monkeypatch.setattr(compiled_mod.torch._inductor, "aoti_load_package", load_package)
    return compiles


# ---------------------------------------------------------------------- experts gathered by id
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize(
    "dispatch", [moe.dispatch_gathered, moe.dispatch_dense, moe.dispatch_sorted]
)
def test_static_dispatches_equal_dropless_dispatch(dtype, n, dispatch):
    torch.manual_seed(n)
    E = 8
    K = 3
    d = 16
    inner = 12
    x = torch.randn(n, d, dtype=dtype)
    gate_up = torch.randn(E, d, 2 * inner, dtype=dtype) / 4
    down = torch.randn(E, inner, d, dtype=dtype) / 4
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(n)])
    weights = torch.rand(n, K)

    def expert(e, rows):
        gate, up = (rows @ gate_up[e]).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ down[e]

    def run(xs, counts):
        return moe.run_experts(xs, counts, expert)

    want, _ = moe.dispatch(x, weights, ids, E, run)
    got = dispatch(x, weights, ids, gate_up, down)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_moe_graph_dispatch_follows_the_pairs_per_expert(monkeypatch, dtype):
    """Gathered (in the graph's dtype, int8 with its scales) while the batch's (token, expert)
    pairs are no more than twice the experts, every expert on every token up to four times, sorted
    by expert beyond (the last two with fp32 matrices, whatever the graph's dtype)."""
    model = tiny_model()
    weights = engine(model).runner.weights.current()
    graph = compiled_mod.DecodeGraph(model, weights, dtype)
    moe_graph = next(b.ffn for b in graph.blocks if isinstance(b.ffn, compiled_mod._MoEGraph))
    E = moe_graph.gate_up.shape[0]
    K = moe_graph.gate.top_k
    assert (moe_graph.gathered_up_to, moe_graph.dense_up_to) == (2, 4)
    called = []
    for name in ("dispatch_gathered", "dispatch_dense", "dispatch_sorted"):
        real = getattr(moe, name)

        def spy(x, w, ids, gate_up, down, *scales, _n=name, _f=real):
            called.append((_n, gate_up.dtype))
            return _f(x, w, ids, gate_up, down, *scales)

        monkeypatch.setattr(moe, name, spy)
    d = model.config.hidden_size
    with torch.no_grad():
        for pairs in (E, 2 * E, 2 * E + K, 4 * E, 4 * E + K):
            moe_graph(torch.randn(pairs // K, d))
    assert called == [
        ("dispatch_gathered", dtype),
        ("dispatch_gathered", dtype),
        ("dispatch_dense", torch.float32),
        ("dispatch_dense", torch.float32),
        ("dispatch_sorted", torch.float32),
    ]


# ---------------------------------------------------------------------- the graph's math (fast)
def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    assert bucket(3, 256) == 256 and bucket(300, 256) == 512
    # a few sequences: contexts from 256 rows; a batch of BATCHED or more: from 64
    assert [compiled_mod.context_bucket(b, 3) for b in (1, 4, 8, 16)] == [256, 256, 64, 64]
    assert (
        compiled_mod.context_bucket(16, 100) == 128 and compiled_mod.context_bucket(4, 300) == 512
    )
    # a graph that takes any context: the next multiple of CONTEXT_STEP, whatever the batch
    step = compiled_mod.CONTEXT_STEP
    assert [compiled_mod.context_bucket(b, 3, dynamic=True) for b in (1, 16)] == [step, step]
    assert compiled_mod.context_bucket(1, 0, dynamic=True) == step
    assert compiled_mod.context_bucket(4, 2 * step, dynamic=True) == 2 * step
    assert compiled_mod.context_bucket(4, 2 * step + 1, dynamic=True) == 3 * step


def test_padded_rows_rebuilt_when_a_block_is_replaced():
    """A row that advances one token keeps its columns only while its earlier blocks stay the
    same: a copied-on-write block (same sequence, next position, another block id) rebuilds it."""
    rope = torch.arange(40.0).unsqueeze(1).expand(-1, 4).contiguous().numpy()
    seq = SimpleNamespace(token_ids=[1] * 7, num_computed=6, block_table=[3, 5])
    kept = compiled_mod._Padded(2, 8, 4, rope.shape[1])

    def same_as_fresh() -> None:
        fresh = compiled_mod._Padded(2, 8, 4, rope.shape[1])
        fresh.fill([seq], rope, rope)
        kept.fill([seq], rope, rope)
        for a, b in zip(kept.tensors, fresh.tensors):
            assert torch.equal(a, b)

    same_as_fresh()
    seq.token_ids.append(2)
    seq.num_computed = 7
    same_as_fresh()  # one more column
    seq.token_ids.append(2)
    seq.num_computed = 8
    seq.block_table = [3, 9, 4]  # block 5 was copied to 9 (copy-on-write)
    same_as_fresh()
    assert kept.tensors[3][0, 4:8].tolist() == [36, 37, 38, 39]


def test_padded_inputs_kept_between_steps_equal_a_fresh_layout(monkeypatch):
    """The graph's inputs that the compiled runner keeps between steps (one new context column a
    step) equal the layout built afresh from the eager runner's prepare at every step: batches that
    shrink as requests finish, n=2 forks (copy-on-write blocks), preemptions (a pool too small for
    the batch) and contexts that grow (CONTEXT_STEP lowered to 4)."""
    uncompiled(monkeypatch)
    monkeypatch.setattr(compiled_mod, "CONTEXT_STEP", 4)
    fast = Engine(
        tiny_model(),
        max_batch_size=4,
        block_size=4,
        num_blocks=10,
        decode="compiled",
        decode_dtype="float32",
    )
    runner = fast.runner
    checked = []

    def prepare(decode, prefill, width, drafts):
        inp = CompiledRunner.prepare(runner, decode, prefill, width, drafts)
        if inp.padded is None:
            return inp
        eager = ModelRunner.prepare(runner, decode, prefill, width, drafts)
        want = compiled_mod._pad(eager, runner.any_context)
        ids, cos, sin, context, bias = inp.padded
        assert [t.shape for t in inp.padded] == [t.shape for t in want]
        assert torch.equal(bias, want[4])
        assert torch.equal(ids, want[0]) and torch.equal(cos, want[1]) and torch.equal(sin, want[2])
        visible = bias[:, :-1] == 0
        assert torch.equal(context[visible], want[3][visible])
        checked.append((len(decode), context.shape))
        return inp

    runner.prepare = prepare
    params = [
        SamplingParams(max_tokens=k, temperature=0, ignore_eos=True, n=n)
        for k, n in ((24, 1), (17, 2), (4, 1))
    ]
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17], [21, 22]]
    outs = fast.generate(prompts, params)
    assert fast.stats()["preemptions"] > 0
    assert {b for b, _ in checked} >= {1, 2, 3} and len({s for _, s in checked}) >= 3
    want = Engine(tiny_model(), max_batch_size=4, block_size=4, num_blocks=10).generate(
        prompts, params
    )
    assert [[c.token_ids for c in o.outputs] for o in outs] == [
        [c.token_ids for c in o.outputs] for o in want
    ]


@pytest.mark.parametrize("dtype,tol,within", PATHS)
def test_decode_graph_teacher_forced_logits_equal_eager_and_recompute(
    monkeypatch, dtype, tol, within
):
    uncompiled(monkeypatch)
    model = tiny_model(**YARN)
    eager = teacher_forced(engine(model))
    fast = engine(model, decode="compiled", decode_dtype=dtype)
    assert isinstance(fast.runner, CompiledRunner)
    got = teacher_forced(fast)
    assert fast.stats()["cached_prompt_tokens"] > 0  # the second round hit the prefix cache
    compare(eager, recomputed(model), FP32_TOL)
    compare(got, eager, tol, within)
    compare(got, recomputed(model), tol, within)


# four experts, two per token: a batch of three (bucket 4) has more pairs than experts
FEW_EXPERTS = dict(n_routed_experts=3, n_group=1, topk_group=1)  # batch 4: 8 pairs > 2 x 3


@pytest.mark.parametrize("dispatch", ["dispatch_dense", "dispatch_sorted"])
@pytest.mark.parametrize("dtype,tol,within", PATHS)
def test_decode_graph_with_every_expert_or_sorted_experts_equals_eager_and_recompute(
    monkeypatch, dtype, tol, within, dispatch
):
    """The graph's experts all run on every token, or sorted by expert (more (token, expert) pairs
    than twice the experts; fp32 matrices in a bf16 or int8 graph), give the eager engine's and a
    full recompute's logits. Three experts, top 2: the padded batch of 4 has 2.7 pairs per
    expert, dense at the default bound of 4, sorted under a bound of 2."""
    uncompiled(monkeypatch)
    monkeypatch.setattr(compiled_mod, "MOE_KERNEL", False)  # the composed ops
    if dispatch == "dispatch_sorted":
        monkeypatch.setattr(compiled_mod, "DENSE_PAIRS_PER_EXPERT", 2)
    called = []
    real = getattr(moe, dispatch)
    monkeypatch.setattr(moe, dispatch, lambda *a: called.append(len(a[0])) or real(*a))
    model = tiny_model(**FEW_EXPERTS, **YARN)
    eager = teacher_forced(engine(model))
    got = teacher_forced(engine(model, decode="compiled", decode_dtype=dtype))
    assert called and set(called) == {4}  # the padded batch of 4; smaller ones gather
    compare(got, eager, tol, within)
    compare(got, recomputed(model), tol, within)


@pytest.mark.skipif(compiler_missing() is not None, reason="no C++ compiler")
@pytest.mark.parametrize("dtype,tol,within", PATHS)
def test_decode_graph_with_the_expert_kernel_equals_eager_and_recompute(
    monkeypatch, dtype, tol, within
):
    """With more (token, expert) pairs than twice the experts, the graph's routed experts run in
    engine/kernels' C++ kernel, and from LINEAR_KERNEL_MIN_ROWS rows (here 4) its dense products
    too, their matrices packed in the graph's dtype; the logits are the eager engine's and a full
    recompute's."""
    uncompiled(monkeypatch)
    monkeypatch.setattr(compiled_mod, "LINEAR_KERNEL_MIN_ROWS", 4)
    called, linear = [], []
    real, real_linear = kernels.moe_experts, kernels.linear
    monkeypatch.setattr(kernels, "moe_experts", lambda *a: called.append(len(a[0])) or real(*a))
    monkeypatch.setattr(kernels, "linear", lambda *a: linear.append(len(a[0])) or real_linear(*a))
    model = tiny_model(**FEW_EXPERTS, **YARN)
    eager = teacher_forced(engine(model))
    fast = engine(model, decode="compiled", decode_dtype=dtype)
    got = teacher_forced(fast)
    assert called and set(called) == {4}  # the padded batch of 4 (2.7 pairs per expert)
    # per layer: 3 attention products and (layer 0) 2 of the FFN or 2 of the shared expert; LM head
    n_layers = len(model.layers)
    assert linear and set(linear) == {4} and len(linear) % (5 * n_layers + 1) == 0
    blocks = fast.runner.graph().blocks
    moe_graph = next(b.ffn for b in blocks if isinstance(b.ffn, compiled_mod._MoEGraph))
    want = torch.float32 if dtype == "float32" else getattr(torch, dtype)
    assert moe_graph.gate_up_k.dtype == want and moe_graph.gate_up32 is None
    assert blocks[0].attn.proj_q_k.dtype == want
    compare(got, eager, tol, within)
    compare(got, recomputed(model), tol, within)


def test_compiled_function_called_directly_after_dynamo(monkeypatch):
    """Each bucket goes through Dynamo once (which compiles it); every later step of that bucket
    calls the compiled function directly with the same tensors, and the logits stay eager's.
    Dynamo traces for real here; the backend runs Dynamo's graph module instead of Inductor.
    (compiler "jit": frozen graphs take "aot" by default.)"""
    monkeypatch.setattr(compiled_mod, "COMPILER", "jit")
    monkeypatch.setattr(compiled_mod, "_inductor", lambda gm, example_inputs: gm)
    armed = []
    arm = compiled_mod._Direct._arm

    def counted(self, args, out):
        arm(self, args, out)
        armed.append(self.direct is not None)

    monkeypatch.setattr(compiled_mod._Direct, "_arm", counted)
    model = tiny_model(**YARN)
    eager = teacher_forced(engine(model))
    fast = engine(model, decode="compiled", decode_dtype="float32")
    steps = []
    decode = fast.runner.decode
    fast.runner.decode = lambda inp: steps.append(inp.num_decode) or decode(inp)
    got = teacher_forced(fast)
    compare(got, eager, FP32_TOL)
    buckets = fast.runner._compiled
    assert buckets and all(d.direct is not None for d in buckets.values())
    assert all(armed) and len(armed) == len(buckets) < len(steps) // 10
    # with freezing off, a weight update (GRPO's) is copied into the graph's inputs: no new trace,
    # eager's logits. (Weights after the last layer's attention: the prefix cache's latents stay
    # valid.)
    monkeypatch.setitem(compiled_mod.INDUCTOR_OPTIONS, "freezing", False)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
        model.layers[-1].mlp.experts.gate_up_proj.mul_(1.5)
    compare(teacher_forced(fast), teacher_forced(engine(model)), FP32_TOL)
    assert fast.runner._compiled is buckets and len(armed) == len(buckets)


def test_decode_graph_follows_weight_updates(monkeypatch):
    """With freezing off (the weights graph inputs), a weight change is copied in place."""
    uncompiled(monkeypatch)
    monkeypatch.setitem(compiled_mod.INDUCTOR_OPTIONS, "freezing", False)
    model = tiny_model()
    fast = engine(model, decode="compiled", decode_dtype="float32")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    before = fast.generate([[5, 6, 7]], params)[0].token_ids
    graph = fast.runner._graph
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    after = fast.generate([[5, 6, 7]], params)[0].token_ids
    assert fast.runner._graph is graph  # updated in place, not rebuilt
    assert after == engine(model).generate([[5, 6, 7]], params)[0].token_ids
    assert before != after


@pytest.mark.parametrize("decode", ["eager", "compiled"])
def test_a_weight_change_drops_the_prefix_cache(monkeypatch, decode):
    """An engine kept while its model is trained (GRPO's rollouts): after a weight change that
    moves every cached latent, no prompt reuses a block cached before it, and the logits are a
    fresh eager engine's. compiled: weights as graph inputs, the change copied in."""
    uncompiled(monkeypatch)
    monkeypatch.setitem(compiled_mod.INDUCTOR_OPTIONS, "freezing", False)
    model = tiny_model()
    e = engine(model, decode=decode, decode_dtype="float32")
    teacher_forced(e)
    hits = e.stats()["cached_prompt_tokens"]
    assert hits > 0
    graph = getattr(e.runner, "_graph", None)
    with torch.no_grad():
        model.layers[0].self_attn.kv_a_proj_with_mqa.weight.mul_(1.5)
        model.lm_head.weight.mul_(-1)
    got = teacher_forced(e, rounds=1)
    assert e.stats()["cached_prompt_tokens"] == hits  # nothing cached before the change
    compare(got, teacher_forced(engine(model, decode="eager"), rounds=1), FP32_TOL)
    assert getattr(e.runner, "_graph", None) is graph  # compiled: copied in, not rebuilt
    teacher_forced(e, rounds=1)
    assert e.stats()["cached_prompt_tokens"] > hits  # the new weights' blocks serve again


def test_no_compiler_or_int8_weights_decode_eager_with_one_warning(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(compiled_mod, "compiler_missing", lambda: "no C++ compiler found")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as caught:
        e = engine(model, decode="compiled")
    assert len(caught) == 1 and type(e.runner) is ModelRunner
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="int8"):
        e = engine(quantize_model(model), decode="auto")
    assert type(e.runner) is ModelRunner
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(engine(model).runner) is ModelRunner  # the default: eager, nothing said
        assert (
            type(
                engine(
                    tiny_model(num_nextn_predict_layers=1), decode="compiled", speculative=True
                ).runner
            )
            is ModelRunner
        )
    with pytest.raises(ValueError, match="decode="):
        engine(model, decode="fast")


def test_default_decode_path_is_auto_unless_the_environment_says(monkeypatch):
    """Engine(decode=None), the default, asks for $NANOSEEK_DECODE when set, else "auto"; an
    explicit decode wins; a bad value names the variable. (choose_runner is stood in for: what
    is asked is recorded, and the eager runner is built, so nothing compiles.)"""
    from nanoseek.engine import engine as engine_mod

    asked = []

    def choose(model, cache, num_layers, decode, decode_dtype, freeze=None):
        asked.append(compiled_mod.resolve_decode(decode))
        return ModelRunner(model, cache, num_layers)

    monkeypatch.setattr(engine_mod, "choose_runner", choose)
    model = tiny_model()
    monkeypatch.delenv(compiled_mod.DECODE_ENV, raising=False)
    engine(model)
    monkeypatch.setenv(compiled_mod.DECODE_ENV, "")
    engine(model)
    monkeypatch.setenv(compiled_mod.DECODE_ENV, "compiled")
    engine(model)
    engine(model, decode="eager")
    assert asked == ["auto", "auto", "compiled", "eager"]
    monkeypatch.setenv(compiled_mod.DECODE_ENV, "fast")
    with pytest.raises(ValueError, match="NANOSEEK_DECODE='fast'"):
        engine(model)
    assert engine(model, decode="auto") and asked[-1] == "auto"
    # the real choice: the environment's eager builds the eager runner, with nothing compiled
    monkeypatch.undo()
    monkeypatch.setenv(compiled_mod.DECODE_ENV, "eager")
    assert type(engine(model).runner) is ModelRunner


def test_cli_decode_default_is_the_engines(monkeypatch):
    """--decode left out passes decode=None (the Engine's default: the environment, else auto)."""
    import argparse

    from nanoseek.cli.common import add_decode_arguments, decode_options

    p = argparse.ArgumentParser()
    add_decode_arguments(p)
    assert decode_options(p.parse_args([])) == {"decode": None, "decode_dtype": "auto"}
    got = decode_options(p.parse_args(["--decode", "compiled", "--decode-dtype", "float32"]))
    assert got == {"decode": "compiled", "decode_dtype": "float32"}
    assert "auto" in p.format_help() and "NANOSEEK_DECODE" in p.format_help()


def test_auto_decodes_eager_off_the_cpu(monkeypatch, capfd):
    """auto builds no compiled step for a model that is not on the CPU (said on stderr)."""

    class Elsewhere(ModelRunner):  # the eager runner, as if its model were on another device
        def __init__(self, *args):
            super().__init__(*args)
            self.device = torch.device("meta")

    monkeypatch.setattr(compiled_mod, "ModelRunner", Elsewhere)
    e = engine(tiny_model(), decode="auto")
    assert type(e.runner) is Elsewhere
    assert "decode path: eager (the model is on meta" in capfd.readouterr().err


def test_int8_graph_holds_int8_matrices_within_their_rounding():
    """decode_dtype="int8": the dense products and the LM head as int8 [out, in], the routed
    experts as int8 [E, in, out], with one bf16 scale per output channel (and expert), each weight
    within half a step of int8's rounding; the absorbed attention's per-head matrices in bf16."""
    model = tiny_model()
    weights = InferenceWeights(model, False)
    graph = compiled_mod.DecodeGraph(model, weights, torch.int8)
    attn = graph.blocks[1].attn
    moe_graph = graph.blocks[1].ffn
    moe_weights = weights.blocks[1].ffn
    for holder, name, w in (
        (attn, "proj_in", weights.blocks[1].attn.proj_in.w_t.t()),
        (attn, "o_proj", weights.blocks[1].attn.o_proj.w_t.t()),
        (moe_graph.shared, "down", moe_weights.shared.down.w_t.t()),
        (graph, "lm_head", weights.lm_head.w_t.t()),
        (moe_graph, "gate_up", moe_weights.gate_up_t.transpose(1, 2)),
        (moe_graph, "down", moe_weights.down_t.transpose(1, 2)),
    ):
        q = getattr(holder, name)  # [..., out, in], the experts' too
        scale = getattr(holder, name + "_s").float().unsqueeze(-1)  # [..., out, 1]
        assert q.dtype == torch.int8 and q.shape == w.shape, name
        assert ((q.float() * scale - w).abs() <= 0.5 * scale * (1 + 1e-5)).all(), name
    assert attn.w_uk.dtype == torch.bfloat16 and attn.w_uv_t.dtype == torch.bfloat16
    assert compiled_mod.DecodeGraph(model, weights, torch.float32).lm_head_s is None
    with pytest.raises(ValueError, match="decode_dtype='float16'"):
        engine(model, decode="compiled", decode_dtype="float16")


# ---------------------------------------------------------------------- AOTInductor packages
def _graph_args(graph_context: int = 256, slots: int = 64) -> tuple[torch.Tensor, ...]:
    """A batch-1 step's inputs for the tiny config (package_key reads their shapes and dtypes)."""
    return (
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, 8),
        torch.zeros(1, 8),
        torch.zeros(2, slots, 24),
        torch.zeros(1, graph_context, dtype=torch.long),
        torch.zeros(1, graph_context + 1),
    )


def test_package_key_follows_weights_inputs_settings_and_dtype():
    """Two graphs over the same weights share a package; another weight value, dtype, bucket or
    cache pool, a setting a module holds, or the thread count, names another one."""
    model = tiny_model()
    weights = InferenceWeights(model, False)

    def key(graph, args=None, any_context=False):
        args = _graph_args() if args is None else args
        digest = compiled_mod.weights_digest(graph)
        return compiled_mod.package_key(graph, digest, args, any_context)

    def graph(dtype=torch.float32):
        return compiled_mod.DecodeGraph(model, weights.current(), dtype)

    base = key(graph())
    assert key(graph()) == base
    assert key(graph(torch.bfloat16)) != base
    assert key(graph(), _graph_args(graph_context=512)) != base
    # a graph for any context: one package whatever the context's length
    anyc = key(graph(), any_context=True)
    assert anyc != base and key(graph(), _graph_args(graph_context=512), True) == anyc
    assert key(graph(), _graph_args(slots=128)) != base
    changed = graph()
    changed.blocks[0].attn.eps = 1e-5
    assert key(changed) != base
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # the GEMM templates' work split is compiled in
    try:
        assert key(graph()) != base
    finally:
        torch.set_num_threads(threads)
    assert key(graph()) == base
    with torch.no_grad():
        model.layers[1].mlp.experts.down_proj[0, 0, 0] += 1e-3  # one routed expert's weight
    assert key(graph()) != base


def test_aot_packages_cached_on_disk_and_damaged_ones_compiled_again(monkeypatch, capfd):
    """A second engine over the same weights loads each bucket's package instead of compiling
    it; a truncated or overwritten package is compiled again with a warning, never a crash; an
    unwritable folder compiles without caching. The logits stay eager's throughout."""
    compiles = uncompiled(monkeypatch)
    assert compiled_mod.COMPILER == "aot"
    model = tiny_model()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = engine(model).generate([[5, 6, 7]], params)[0].token_ids

    def run() -> tuple[Engine, list[int]]:
        e = engine(model, decode="compiled", decode_dtype="float32")
        return e, e.generate([[5, 6, 7]], params)[0].token_ids

    first, tokens = run()
    (pack,) = first.runner._compiled.values()  # batch 1, any context: one graph
    assert tokens == want and pack.source == "compiled" and len(compiles) == 1
    assert os.path.dirname(pack.path) == compiled_mod.package_dir()
    assert os.listdir(compiled_mod.package_dir()) == [os.path.basename(pack.path)]  # no tmp left
    again, tokens = run()
    (hit,) = again.runner._compiled.values()
    assert tokens == want and hit.source == "cache" and hit.path == pack.path
    assert len(compiles) == 1
    assert "loaded the decode step for batch 1, any context (float32)" in capfd.readouterr().err
    size = os.path.getsize(pack.path)
    with open(pack.path, "r+b") as f:
        f.truncate(size // 2)
    for damage in ("truncated", "overwritten"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e, tokens = run()
        (p,) = e.runner._compiled.values()
        assert tokens == want and p.source == "compiled"
        assert any("cannot be loaded" in str(w.message) for w in caught), damage
        with open(p.path, "r+b") as f:  # now damage the new one's bytes (a CRC mismatch)
            raw = bytearray(f.read())
            at = raw.index(b"graph") + len(b"graph") + 2  # the member's data: after its name
            raw[at] ^= 0xFF
            f.seek(0)
            f.write(raw)
    assert len(compiles) == 3
    # a folder that cannot be created: compiled for this process only, with a warning
    blocker = os.path.join(compiled_mod.package_dir(), "blocker")
    open(blocker, "w").close()
    monkeypatch.setattr(compiled_mod, "package_dir", lambda: os.path.join(blocker, "packages"))
    with pytest.warns(RuntimeWarning, match="without caching"):
        _, tokens = run()
    assert tokens == want


def test_a_batched_bucket_keeps_its_faster_compilation_and_records_the_choice(monkeypatch, capfd):
    """A batch of BATCHED or more is compiled once per GEMM choice; the graph that runs the step
    faster is kept, and a second engine over the same weights loads that package only. The
    logits stay eager's."""
    uncompiled(monkeypatch)
    monkeypatch.setattr(compiled_mod, "GEMM_CHOICES", {"quick": {}, "slow": {"slow": True}})
    load = compiled_mod._Packaged._load_or_compile

    def slowed(self, args):  # the "slow" variant's graph takes 20 ms longer a call
        run = load(self, args)
        if self.options.get("slow"):
            self.run = lambda inputs: (time.sleep(0.02), run(inputs))[1]
        return self.run

    monkeypatch.setattr(compiled_mod._Packaged, "_load_or_compile", slowed)
    model = tiny_model()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[5 + i, 6, 7] for i in range(compiled_mod.BATCHED)]

    def run(**kw) -> tuple[Engine, list[list[int]]]:
        e = Engine(model, max_batch_size=8, block_size=4, num_blocks=96, **kw)
        return e, [out.token_ids for out in e.generate(prompts, params)]

    def compiled() -> tuple[compiled_mod._Fastest, list[list[int]]]:
        e, tokens = run(decode="compiled", decode_dtype="float32")
        return e.runner._compiled[(compiled_mod.BATCHED, None)], tokens

    _, want = run()
    fastest, tokens = compiled()
    assert tokens == want
    assert fastest.chosen == "quick" and fastest.source == "compiled"
    assert fastest.seconds["slow"] > fastest.seconds["quick"] + 0.015
    assert fastest.variants["slow"].run is None  # the other's loaded model freed
    assert "keeping quick" in capfd.readouterr().err
    (record,) = [n for n in os.listdir(compiled_mod.package_dir()) if n.endswith(".choice")]
    with open(os.path.join(compiled_mod.package_dir(), record)) as f:
        assert f.read() == "quick"
    hit, tokens = compiled()
    assert tokens == want and hit.chosen == "quick" and hit.source == "cache"
    assert hit.path == fastest.path and not hit.seconds  # not timed again
    assert hit.variants["slow"].source is None  # never loaded
    assert "quick products, as timed before" in capfd.readouterr().err
    os.remove(fastest.path)  # the recorded package is gone: compiled and timed again
    again_timed, tokens = compiled()
    assert tokens == want and again_timed.seconds and again_timed.chosen == "quick"
    assert again_timed.variants["slow"].source == "cache"


def test_a_batched_variant_that_fails_to_compile_is_left_out(monkeypatch):
    uncompiled(monkeypatch)
    monkeypatch.setattr(compiled_mod, "GEMM_CHOICES", {"works": {}, "broken": {"broken": True}})
    compile_package = compiled_mod._Packaged._compile

    def compile_or_fail(self, args, path):
        if self.options.get("broken"):
            raise RuntimeError("no kernel for this product")
        compile_package(self, args, path)

    monkeypatch.setattr(compiled_mod._Packaged, "_compile", compile_or_fail)
    model = tiny_model()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[5 + i, 6, 7] for i in range(compiled_mod.BATCHED)]
    eager = Engine(model, max_batch_size=8, block_size=4, num_blocks=96)
    want = [o.token_ids for o in eager.generate(prompts, params)]
    fast = Engine(
        model,
        max_batch_size=8,
        block_size=4,
        num_blocks=96,
        decode="compiled",
        decode_dtype="float32",
    )
    with pytest.warns(RuntimeWarning, match="could not compile .* broken products .* no kernel"):
        got = [o.token_ids for o in fast.generate(prompts, params)]
    assert got == want
    assert fast.runner._compiled[(compiled_mod.BATCHED, None)].chosen == "works"


def test_a_graph_aotinductor_cannot_compile_goes_through_torch_compile(monkeypatch):
    uncompiled(monkeypatch)

    def fails(self, args, path):
        raise RuntimeError("an operator export cannot trace")

    monkeypatch.setattr(compiled_mod._Packaged, "_compile", fails)
    model = tiny_model()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with pytest.warns(RuntimeWarning, match="AOTInductor could not compile .* cannot trace"):
        fast = engine(model, decode="compiled", decode_dtype="float32")
    assert fast.generate([[5, 6, 7]], params)[0].token_ids == (
        engine(model).generate([[5, 6, 7]], params)[0].token_ids
    )
    assert [type(b) for b in fast.runner._compiled.values()] == [compiled_mod._Direct]
    assert not os.path.exists(compiled_mod.package_dir()) or not os.listdir(
        compiled_mod.package_dir()
    )


def test_packages_beyond_the_limit_least_recently_used_first(tmp_path):
    folder = tmp_path / "packages"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.pt2").write_bytes(b"x")
        os.utime(folder / f"{i}.pt2", (1000 + i, 1000 + i))
    (folder / "old.1-ab.tmp.pt2").write_bytes(b"x")  # a crashed compilation's, long ago
    os.utime(folder / "old.1-ab.tmp.pt2", (1000, 1000))
    (folder / "new.2-cd.tmp.pt2").write_bytes(b"x")  # another process compiling now
    compiled_mod._prune(str(folder), 3)
    assert sorted(os.listdir(folder)) == ["2.pt2", "3.pt2", "4.pt2", "new.2-cd.tmp.pt2"]


# ---------------------------------------------------------------------- compiled for real (slow)
COMPILED = [(d, tol, within, "aot") for d, tol, within in PATHS] + [
    ("float32", FP32_TOL, 1.0, "jit")
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol,within,compiler", COMPILED)
def test_compiled_teacher_forced_logits_equal_eager_and_recompute(
    monkeypatch, dtype, tol, within, compiler, capfd
):
    """Compiled by AOTInductor (the default for frozen weights) and by torch.compile's C++
    wrapper (compiled.COMPILER "jit")."""
    monkeypatch.setattr(compiled_mod, "COMPILER", compiler)
    model = tiny_model(**YARN)
    eager = teacher_forced(engine(model))
    counters.clear()
    fast = engine(model, decode="compiled", decode_dtype=dtype)
    got = teacher_forced(fast)
    if dtype == "int8":  # every dense product and the LM head: Inductor's int8 GEMM (2 layers)
        assert counters["inductor"]["woq_matcher_count"] >= 2 * 5 + 1
    assert "decode path: compiled" in capfd.readouterr().err
    assert fast.runner.compile_seconds  # each bucket's compile time, reported
    compare(got, eager, tol, within)
    compare(got, recomputed(model), tol, within)
    # frozen weights (the default) are constants of the code: a weight update rebuilds and
    # recompiles the graph, and the logits follow eager's
    buckets = fast.runner._compiled
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
        model.layers[-1].mlp.experts.gate_up_proj.mul_(1.5)
    compare(teacher_forced(fast), teacher_forced(engine(model)), tol, within)
    assert fast.runner._compiled is not buckets
    kind = compiled_mod._Packaged if compiler == "aot" else compiled_mod._Direct
    assert all(type(b) is kind for b in buckets.values())


@pytest.mark.slow
def test_aot_package_from_disk_gives_the_same_logits():
    """AOTInductor for real: a second engine over the same weights loads the first one's packages
    (no compilation) and computes the same logits, bit for bit; a truncated package is compiled
    again, with a warning."""
    model = tiny_model(**YARN)
    eager = teacher_forced(engine(model))
    first = engine(model, decode="compiled", decode_dtype="float32")
    got = teacher_forced(first)
    compare(got, eager, FP32_TOL)
    packs = first.runner._compiled
    assert packs and all(p.source == "compiled" for p in packs.values())
    again = engine(model, decode="compiled", decode_dtype="float32")
    assert all(torch.equal(a, got[k]) for k, a in teacher_forced(again).items())
    assert [p.source for p in again.runner._compiled.values()] == ["cache"] * len(packs)
    for p in packs.values():
        with open(p.path, "r+b") as f:
            f.truncate(os.path.getsize(p.path) - 1000)
    with pytest.warns(RuntimeWarning, match="cannot be loaded"):
        third = engine(model, decode="compiled", decode_dtype="float32")
        compare(teacher_forced(third), eager, FP32_TOL)
    assert all(p.source == "compiled" for p in third.runner._compiled.values())


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["dispatch_dense", "dispatch_sorted"])
def test_compiled_dense_or_sorted_experts_equal_eager_and_recompute(monkeypatch, dispatch):
    """Every expert on every token, or the pairs sorted by expert (the grouped product as the
    custom op), compiled for real, fp32."""
    monkeypatch.setattr(compiled_mod, "MOE_KERNEL", False)  # the composed ops
    if dispatch == "dispatch_sorted":
        monkeypatch.setattr(compiled_mod, "DENSE_PAIRS_PER_EXPERT", 2)
    called = []
    real = getattr(moe, dispatch)
    monkeypatch.setattr(moe, dispatch, lambda *a: called.append(len(a[0])) or real(*a))
    model = tiny_model(**FEW_EXPERTS, **YARN)
    eager = teacher_forced(engine(model))
    got = teacher_forced(engine(model, decode="compiled", decode_dtype="float32"))
    assert 4 in called  # traced into the batch-4 graph
    compare(got, eager, FP32_TOL)
    compare(got, recomputed(model), FP32_TOL)


@pytest.mark.slow
def test_compiled_expert_kernel_equals_eager_and_recompute(monkeypatch):
    """The C++ kernels (routed experts, and dense products from 4 rows) called from a package
    compiled for real (AOTInductor calls the ops by name), fp32, and from that package loaded
    again by a second engine."""
    monkeypatch.setattr(compiled_mod, "LINEAR_KERNEL_MIN_ROWS", 4)
    model = tiny_model(**FEW_EXPERTS, **YARN)
    eager = teacher_forced(engine(model))
    got = teacher_forced(engine(model, decode="compiled", decode_dtype="float32"))
    again = teacher_forced(engine(model, decode="compiled", decode_dtype="float32"))
    compare(got, eager, FP32_TOL)
    compare(got, recomputed(model), FP32_TOL)
    compare(again, got, 0.0)


@pytest.mark.slow
def test_auto_measures_and_says_which_path_runs(capfd):
    e = engine(tiny_model(), decode="auto")
    err = capfd.readouterr().err
    assert "decode path:" in err and "eager" in err and "compiled float32" in err
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = engine(tiny_model()).generate([[5, 6, 7]], params)[0].token_ids
    assert e.generate([[5, 6, 7]], params)[0].token_ids == want


def test_frozen_weights_are_rebuilt_not_copied(monkeypatch):
    """With Inductor's freezing on (the default: the weights constants of the compiled code), a
    weight change rebuilds the graph (a recompilation) instead of copying into tensors the code
    does not read."""
    uncompiled(monkeypatch)
    assert compiled_mod.INDUCTOR_OPTIONS["freezing"]
    model = tiny_model()
    fast = engine(model, decode="compiled", decode_dtype="float32")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    fast.generate([[5, 6, 7]], params)
    graph = fast.runner._graph
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    after = fast.generate([[5, 6, 7]], params)[0].token_ids
    assert fast.runner._graph is not graph
    assert after == engine(model).generate([[5, 6, 7]], params)[0].token_ids
