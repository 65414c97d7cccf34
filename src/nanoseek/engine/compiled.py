"""The decode step compiled: one graph per batch bucket (and, for torch.compile's graphs, per
context bucket), called without Dynamo.

A step whose every token is one sequence's next token (no prefill chunk, no speculation) is the
engine's hot loop; eager, it is hundreds of small launches and matrix-vector products that read
weights at a fraction of the memory bandwidth. Here the whole step (embedding, every block: absorbed
MLA over the gathered cache rows, routing, the experts gathered by id with model/moe.py's
`dispatch_gathered`; final norm, LM head) is one tensor program, compiled by Inductor with its C++
wrapper and max-autotune, which picks its C++ GEMM templates (shared/spec/cpu-decode-probe.md: the
default mode gains nothing). A batch with more than one (token, expert) pair per expert runs its
routed experts in a C++ kernel instead (engine/kernels: each pair once, each expert's weights read
once), and a batch of LINEAR_KERNEL_MIN_ROWS or more its dense products in the same kernel's
tiles; the compiled code calls them as ops. Its shapes are static but for the context's length
in a graph compiled ahead of time: the batch is padded to a power of two; the context to a multiple
of CONTEXT_STEP rows (ahead of time, a dynamic dimension), or, in torch.compile's graphs, to a power
of two of at least CONTEXT_MIN rows (CONTEXT_MIN_BATCHED for a batch of BATCHED or more, whose step
spends more on attention over the padding). Either way a few compilations serve a whole generation.

A graph with frozen weights is compiled ahead of time by AOTInductor (COMPILER "aot": the exported
graph, its weights packed in, one package per batch bucket) and kept on disk under package_dir(),
keyed by a hash of the weights, the bucket's input shapes, the dtype, the traced code, torch's
version, the CPU's flags and the thread count, so that a later process with the same weights
loads it (about 2 s for its first package, 0.1 s for each further one) instead of compiling it
again (_Packaged); its call has no Python and no per-call constant handles between kernels. A
bucket of BATCHED or more sequences is compiled twice (GEMM_CHOICES: max-autotune's matrix
products and oneDNN's), and the graph that runs its first step faster is kept (_Fastest).
COMPILER "jit" (and any graph with the weights as inputs) goes through torch.compile with
Inductor's C++ wrapper instead (_Direct).

Around the graph, a step costs little: the runner lays a pure-decode step straight into its
bucket's input buffers, kept between steps (one new context column per sequence; _Padded), and
calls the compiled code with those same tensors (_Packaged's loaded package; _Direct, once Dynamo
has compiled a bucket, Inductor's function directly: no guards, no frame hook). The weights are
frozen: constants of the compiled code, which max-autotune packs for its C++ GEMM templates, so a
weight change rebuilds and recompiles the graph (or loads it from package_dir(), if these weights
were compiled before). With INDUCTOR_OPTIONS["freezing"] off they are graph inputs instead: a weight
change (GRPO) is copied into the graph's tensors and nothing is recompiled, for a slower step
(docs/engine.md).

The graph reads the latent cache (an input: it changes every step) and returns the step's latents;
the runner writes them with one index_copy_ over all layers, for the real rows only. Padded rows
attend to themselves alone. Everything else (prefill, mixed steps, speculation, int8 weights) runs
the eager runner, which stays the reference. dtype bfloat16 stores the graph's matrices in bf16 and
feeds them bf16 activations; norms, routing, attention scores, the residual stream and the logits
stay fp32. dtype int8 is bfloat16 with the dense products, the LM head and the gathered routed
experts in weight-only int8 (one bf16 scale per output channel; the dense products through
Inductor's int8 GEMM over frozen weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from functools import cache, partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.engine import kernels
from nanoseek.engine.cache import LatentCache
from nanoseek.engine.quant import is_quantized, quantize_tensor
from nanoseek.engine.runner import ModelRunner, StepInput
from nanoseek.engine.weights import Attention, BlockWeights, InferenceWeights, MoEWeights, SwiGLU
from nanoseek.io import atomic_file
from nanoseek.model import attention, moe
from nanoseek.model.attention import absorb_query, attend_latent, expand_output
from nanoseek.model.transformer import Transformer
from nanoseek.train.precision import cpu_flags, native_bf16

# A graph compiled ahead of time takes any context length (a dynamic dimension): the context is
# padded to the next multiple of CONTEXT_STEP rows only, and one package serves a batch bucket.
# Against a context padded to 256 rows, a batch-1 graph call at one thread: 1.46 vs 1.57 ms with 32
# rows, 1.48 vs 1.55 with 96, 1.56 vs 1.56 with 250 (docs/engine.md)
CONTEXT_STEP = 16
# torch.compile's graphs (COMPILER "jit", weights as inputs) have static shapes: the context is
# padded to a power of two of at least CONTEXT_MIN rows (cache rows before a decoding token)
CONTEXT_MIN = 256
# ... for a padded batch of BATCHED sequences or more, whose attention over padded rows is a large
# share of the step
# (16 requests x 128 tokens, one thread: 3.6-4.0x the batch-1 speed with 256, 4.8x with 64)
CONTEXT_MIN_BATCHED = 64
BATCHED = 8
INDUCTOR_OPTIONS = {
    "max_autotune": True,
    # the weights are constants that max-autotune packs for its C++ GEMM templates (a batch-1
    # step, one thread: 1.93 -> 1.80 ms in fp32, 2.48 -> 1.33 ms in bf16), at the price of a
    # recompilation at every weight change. False makes them graph inputs: a weight update is then
    # copied in place with no recompilation (for a policy that changes between rollouts)
    "freezing": True,
    "cpp_wrapper": True,
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}
# How a graph with frozen weights is compiled: "aot", AOTInductor (torch.export, then
# aoti_compile_and_package; the package cached on disk, _Packaged), or "jit", torch.compile with the
# C++ wrapper (_Direct). A batch-1 graph call, one thread, best of 12 interleaved rounds: fp32
# 1.54-1.62 ms jit vs 1.42-1.45 aot, bf16 1.16-1.20 vs 0.98-1.04 (docs/engine.md). Graphs with the
# weights as inputs always take "jit": Inductor's own cache serves those
COMPILER = "aot"
COMPILERS = ("aot", "jit")
# packages kept in package_dir() (the least recently used beyond are deleted): one is 40-70 MB for
# the reference config, one per (weights, bucket, dtype)
PACKAGES_KEPT = 24
# A batch of BATCHED or more reads every routed expert's weights at each step, and its large
# products read them from L3: max-autotune times each product alone, its weights left in L2 by the
# previous run, so its pick between the C++ GEMM template and oneDNN does not hold in the running
# graph (batch 16, two threads: a call of 3.9 ms or 5.2-5.5 ms, as the pick fell, between
# compilations; 4.8 ms with oneDNN for every product). Such a bucket is compiled once per entry
# here, and the graph that runs the bucket's own step fastest is kept (_Fastest)
GEMM_CHOICES = {"max-autotune": {}, "oneDNN": {"max_autotune_gemm_backends": "ATEN"}}
# A batch whose routed experts see more than KERNEL_ABOVE_PAIRS_PER_EXPERT (token, expert) pairs
# per expert runs them through the CPU kernel engine/kernels/moe_experts.cpp (each pair computed
# once, each expert's weights read once, one call per layer) where it builds; False keeps the
# composed ops of model/moe.py
MOE_KERNEL = True
# ... and a step of LINEAR_KERNEL_MIN_ROWS rows or more runs its dense products (the attention's
# projections, the shared experts, layer 0's FFN, the LM head) through the same kernel's tiles
# (`kernels.linear`): at 16 rows oneDNN's fp32 products ran at about 46 GFLOP/s, and the LM head
# [16, 256] x [256, 8192] took 1,266 us against the kernel's 688 (Zen 4, one thread)
LINEAR_KERNEL_MIN_ROWS = 8


def log(message: str) -> None:
    print(f"nanoseek engine: {message}", file=sys.stderr, flush=True)


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


def context_bucket(batch: int, rows: int, dynamic: bool = False) -> int:
    """The context (cache rows before each token) of a padded batch whose longest context has
    `rows` rows: for a graph that takes any context (dynamic), the next multiple of CONTEXT_STEP;
    else a power of two of at least CONTEXT_MIN (CONTEXT_MIN_BATCHED for a batch of BATCHED or
    more)."""
    if dynamic:
        return max(1, -(-rows // CONTEXT_STEP)) * CONTEXT_STEP
    least = CONTEXT_MIN if batch < BATCHED else min(CONTEXT_MIN, CONTEXT_MIN_BATCHED)
    return bucket(rows, least)


def compiler_missing() -> str | None:
    """Why Inductor's C++ path cannot run here, or None."""
    cxx = os.environ.get("CXX") or "g++"
    if not any(shutil.which(name) for name in (cxx, "c++", "clang++")):
        return "no C++ compiler found (set CXX or install g++)"
    return None


def _mm(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, s: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ w (+ b) in w's dtype, handed back in fp32. With s (bf16 scales, one per output
    channel), w is int8 [out, in] (weight-only): bf16 activations times w converted to bf16, the
    product scaled, the pattern that Inductor's freezing passes turn into its int8 GEMM."""
    if s is None:
        y = torch.mm(x.to(w.dtype), w)
    else:
        y = torch.mm(x.to(s.dtype), w.t().to(s.dtype)) * s
    y = y.float()
    return y if b is None else y + b


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _Params(nn.Module):
    """Tensors as buffers: inputs of the compiled graph, which the runner updates in place when
    the model's weights change."""

    def put(self, name: str, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> None:
        t = None if t is None else t.detach().to(dtype or t.dtype).contiguous()
        self.register_buffer(name, t, persistent=False)

    def matrix(self, name: str, w_t: torch.Tensor, dtype: torch.dtype, packed: bool) -> None:
        """A matrix w_t [in, out] for `mm`, as `name`, in dtype; torch.int8: weight-only int8,
        stored [out, in] with its per-output-channel scales (bf16) as `name`_s (None otherwise).
        packed: also in the CPU kernel's tiles, as `name`_k (and its int8 scales, `name`_k_s)."""
        if dtype == torch.int8:
            q, scale = quantize_tensor(w_t.t(), torch.bfloat16)
            self.put(name, q)
            self.put(name + "_s", scale)
        else:
            self.put(name, w_t, dtype)
            self.put(name + "_s", None)
        tiles = kernels.pack_linear(w_t, dtype) if packed else ()
        for suffix, t in itertools.zip_longest(("_k", "_k_s"), tiles):
            self.put(name + suffix, t)
        self.linear_from = LINEAR_KERNEL_MIN_ROWS  # an instance setting: the package key holds it

    def mm(self, name: str, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x @ the matrix `name` (+ b), in fp32: through the CPU kernel from
        LINEAR_KERNEL_MIN_ROWS rows where the matrix is packed, else _mm."""
        w, s, k = getattr(self, name), getattr(self, name + "_s"), getattr(self, name + "_k")
        if k is None or x.shape[0] < self.linear_from:
            return _mm(x, w, b, s)
        y = kernels.linear(x, k, getattr(self, name + "_k_s"), w.shape[1 if s is None else 0])
        return y if b is None else y + b


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the matrices that an int8 graph keeps in floating point (the absorbed
    attention's per-head products): bf16."""
    return torch.bfloat16 if dtype == torch.int8 else dtype


class _AttentionGraph(_Params):
    def __init__(self, a: Attention, dtype: torch.dtype, packed: bool):
        super().__init__()
        self.n_heads = a.n_heads
        self.nope = a.nope
        self.rope = a.rope
        self.kv_rank = a.kv_rank
        self.scale = a.scale
        self.eps = a.eps
        self.kv_norm_eps = a.kv_norm_eps
        self.q_lora = a.q_lora
        self.q_norm_eps = a.q_norm_eps if a.q_lora else None
        self.split_in = list(a.split_in)
        self.matrix("proj_in", a.proj_in.w_t, dtype, packed)
        self.put("proj_in_b", a.proj_in.b, torch.float32)
        self.put("kv_norm", a.kv_norm, torch.float32)
        self.matrix("proj_q", a.proj_q.w_t, dtype, packed)
        self.put("w_uk", a.w_uk, _float_dtype(dtype))
        self.put("w_uv_t", a.w_uv_t, _float_dtype(dtype))
        self.matrix("o_proj", a.o_proj.w_t, dtype, packed)
        self.put("o_proj_b", a.o_proj.b, torch.float32)

    def forward(self, x, cos, sin, cache_rows, bias):
        """x [B, d] fp32, cos/sin [B, rope], cache_rows [B, S, C + rope] (the
        positions before each token's), bias [B, S + 1] -> (attention output [B, d]
        fp32, the step's latents [B, C + rope])."""
        H = self.n_heads
        n = self.nope
        r = self.rope
        h = _rms(x, self.eps)
        if self.q_lora:
            c_q, c_kv, k, k_rot = self.mm("proj_in", h, self.proj_in_b).split(self.split_in, dim=-1)
            q_in = _rms(c_q, self.q_norm_eps)
        else:
            c_kv, k, k_rot = self.mm("proj_in", h, self.proj_in_b).split(self.split_in, dim=-1)
            q_in = h
        c_kv = _rms(c_kv, self.kv_norm_eps) * self.kv_norm
        parts = self.mm("proj_q", q_in).split([H * n, H * r, H * r], -1)
        q_nope, q, q_rot = (t.unflatten(-1, (H, -1)) for t in parts)
        q_rope = q * cos.unsqueeze(1) + q_rot * sin.unsqueeze(1)
        latent = torch.cat((c_kv, k * cos + k_rot * sin), dim=-1)
        w_dtype = self.w_uk.dtype
        q_lat = absorb_query(q_nope.to(w_dtype), q_rope.to(w_dtype), self.w_uk).float()
        kv = torch.cat((cache_rows.float(), latent.unsqueeze(1)), dim=1)  # [B, S + 1, C + rope]
        mask = bias.unsqueeze(1).expand(-1, H, -1)
        o = attend_latent(q_lat, kv, mask, self.scale, self.kv_rank)  # [B, H, C]
        out = expand_output(o.to(self.w_uv_t.dtype), self.w_uv_t)
        return self.mm("o_proj", out, self.o_proj_b), latent


class _SwiGLUGraph(_Params):
    def __init__(self, mlp: SwiGLU, dtype: torch.dtype, packed: bool):
        super().__init__()
        self.matrix("gate_up", mlp.gate_up.w_t, dtype, packed)
        self.matrix("down", mlp.down.w_t, dtype, packed)

    def forward(self, x):
        gate, up = self.mm("gate_up", x).chunk(2, dim=-1)
        return self.mm("down", F.silu(gate) * up)


# A decode batch's (token, expert) pairs per routed expert up to which the graph gathers each
# pair's expert by id, and up to which it runs every expert on every token (then: sorted by expert)
GATHERED_PAIRS_PER_EXPERT = 2
DENSE_PAIRS_PER_EXPERT = 4
# ... beyond which the CPU kernel runs them, where it is built (MOE_KERNEL). Zen 4, one thread,
# the trained reference checkpoint, fp32 tok/s gathered vs kernel: 1 sequence 775 vs 756, 4
# sequences (1 pair per expert) 1,457 vs 1,479, 8 sequences (2) 1,473 vs 2,083
KERNEL_ABOVE_PAIRS_PER_EXPERT = 1


class _MoEGraph(_Params):
    def __init__(self, m: MoEWeights, dtype: torch.dtype, batched_kernel: bool):
        super().__init__()
        self.gate = m.router.gate  # the model's moe.Router: its route() decides, in the graph
        self.put("router", m.router.w_t, torch.float32)
        self.put("router_bias", m.router.bias, torch.float32)
        self.shared = _SwiGLUGraph(m.shared, dtype, batched_kernel)
        # which dispatch a batch takes (instance settings: the package key holds them)
        self.gathered_up_to = GATHERED_PAIRS_PER_EXPERT
        self.dense_up_to = DENSE_PAIRS_PER_EXPERT
        self.kernel_above = KERNEL_ABOVE_PAIRS_PER_EXPERT
        # The experts' matrices are held [E, out, in], the model's parameters' own layout, and
        # handed to moe's dispatch as x @ W views (.mT): a gathered expert's product then reduces
        # along contiguous rows (five MoE layers, batch 1, one thread: 0.49 -> 0.32 ms in fp32,
        # 0.27 -> 0.21 in bf16, int8 level; batch 4, fp32: 1.82 -> 1.19 ms)
        gate_up, down = m.gate_up_t.mT, m.down_t.mT
        if dtype == torch.int8:  # with [E, out] bf16 scales, per expert and output channel
            for name, w in (("gate_up", gate_up), ("down", down)):
                q, scale = quantize_tensor(w, torch.bfloat16)
                self.put(name, q)
                self.put(name + "_s", scale)
        else:
            self.put("gate_up", gate_up, _float_dtype(dtype))
            self.put("down", down, _float_dtype(dtype))
            self.put("gate_up_s", None)
            self.put("down_s", None)
        # The batched experts' matrices. With the CPU kernel (engine/kernels): packed in its
        # tiles, in the graph's dtype (its products accumulate in fp32). Without, the dense and
        # sorted experts' fp32 copies for bf16 and int8 graphs: an int8 scale per expert and output
        # channel does not survive flattening the experts into one down product, bf16 products of
        # 16 rows ran no faster than fp32 on the Xeon (2 threads: [16, 256] x [256, 4096] 239 vs
        # 216 us), and bf16 grouped products are slow
        self.kernel = batched_kernel
        packed = kernels.pack_experts(m.gate_up_t, m.down_t, dtype) if batched_kernel else ()
        for name, t in itertools.zip_longest(
            ("gate_up_k", "down_k", "gate_up_k_s", "down_k_s"), packed
        ):
            self.put(name, t)
        copies = dtype != torch.float32 and not batched_kernel
        self.put("gate_up32", gate_up if copies else None, torch.float32)
        self.put("down32", down if copies else None, torch.float32)

    def forward(self, x):
        weights, ids, _ = self.gate.route(torch.mm(x, self.router), self.router_bias)
        # Each expert's weights read once per (token, expert) pair while the pairs are few;
        # beyond, once per batch: in the CPU kernel, which computes each pair once; without it,
        # every expert on every token in two plain products while the pairs are a few times the
        # experts, then the pairs sorted by expert, one grouped product per matrix. Five MoE
        # layers of the reference config, fp32, one / two threads, ms (Xeon, before the kernel):
        # 8 tokens: gathered 2.16 / 1.19, dense 2.26 / 1.26, sorted 2.29 / 1.94;
        # 16 tokens: gathered 4.14 / 2.11, dense 2.72 / 1.57, sorted 2.83 / 2.45;
        # 32 tokens: dense 4.62 / 2.59, sorted 3.92 / 2.89; one thread, 64 tokens: dense 7.73,
        # sorted 5.20; 128: 16.0 / 7.71. The dense bound is where it wins at both thread counts
        pairs_per_expert = ids.numel() / self.gate_up.shape[0]
        if self.kernel and pairs_per_expert > self.kernel_above:  # each pair once, in C++
            routed = kernels.moe_experts(
                x, weights, ids, self.gate_up_k, self.down_k, self.gate_up_k_s, self.down_k_s
            )
        elif pairs_per_expert > self.gathered_up_to:
            copies = self.gate_up32 is not None
            gate_up, down = (self.gate_up32, self.down32) if copies else (self.gate_up, self.down)
            dispatch = (
                moe.dispatch_dense if pairs_per_expert <= self.dense_up_to else moe.dispatch_sorted
            )
            routed = dispatch(x, weights, ids, gate_up.mT, down.mT)
        else:  # int8 experts come with their scales (x then goes bf16)
            xw = x.to(self.gate_up.dtype) if self.gate_up_s is None else x
            routed = moe.dispatch_gathered(
                xw, weights, ids, self.gate_up.mT, self.down.mT, self.gate_up_s, self.down_s
            )
        return self.shared(x) + routed.float()


class _BlockGraph(_Params):
    def __init__(self, w: BlockWeights, dtype: torch.dtype, batched_kernel: bool):
        super().__init__()
        self.attn = _AttentionGraph(w.attn, dtype, batched_kernel)
        self.ffn_eps = w.ffn_eps
        self.put("ffn_norm", w.ffn_norm, torch.float32)
        moe_ffn = isinstance(w.ffn, MoEWeights)
        self.ffn = (
            _MoEGraph(w.ffn, dtype, batched_kernel)
            if moe_ffn
            else _SwiGLUGraph(w.ffn, dtype, batched_kernel)
        )

    def forward(self, x, cos, sin, cache_rows, bias):
        a, latent = self.attn(x, cos, sin, cache_rows, bias)
        x = x + a
        return x + self.ffn(_rms(x, self.ffn_eps) * self.ffn_norm), latent


class DecodeGraph(_Params):
    """The decode step of B sequences, one token each: a module whose forward is the graph."""

    def __init__(
        self,
        model: Transformer,
        weights: InferenceWeights,
        dtype: torch.dtype,
        batched_kernel: bool = False,
    ):
        super().__init__()
        self.n_layers = len(model.layers)
        self.put("embed", model.embed_tokens.weight, torch.float32)
        blocks = weights.blocks[: self.n_layers]
        self.blocks = nn.ModuleList(_BlockGraph(b, dtype, batched_kernel) for b in blocks)
        self.norm_eps = model.norm.eps
        self.put("norm", model.norm.weight, torch.float32)
        self.matrix("lm_head", weights.lm_head.w_t, dtype, batched_kernel)

    def forward(self, ids, cos, sin, kv, context, bias):
        """ids [B], cos/sin [B, rope] (fp32), kv [layers, slots, C + rope] (the cache), context
        [B, S] the cache rows before each token (padded), bias [B, S + 1] 0 or -inf (the last
        column, the token itself, is 0) -> (final-normed hidden [B, d], logits [B, V] fp32,
        latents [layers, B, C + rope] in the cache's dtype)."""
        x = self.embed.index_select(0, ids)
        latents = []
        for layer, block in enumerate(self.blocks):
            rows = kv[layer].index_select(0, context.flatten()).view(*context.shape, -1)
            x, latent = block(x, cos, sin, rows, bias)
            latents.append(latent)
        h = _rms(x, self.norm_eps) * self.norm
        return h, self.mm("lm_head", h), torch.stack(latents).to(kv.dtype)


class CompiledRunner(ModelRunner):
    """ModelRunner whose pure-decode steps run a compiled DecodeGraph (eager for everything else).
    dtype: the graph's matrices (torch.float32, torch.bfloat16, or torch.int8: weight-only int8
    dense products, LM head and routed experts, see DECODE_DTYPES). freeze: the weights are
    constants of the compiled code (a weight change recompiles) or, False, graph inputs (a weight
    change is copied in place); None follows INDUCTOR_OPTIONS["freezing"]. compiler: "aot" or
    "jit" for a graph with frozen weights (see COMPILER, which None follows)."""

    def __init__(
        self,
        model: Transformer,
        cache: LatentCache,
        num_layers: int,
        dtype: torch.dtype,
        freeze: bool | None = None,
        compiler: str | None = None,
    ):
        super().__init__(model, cache, num_layers)
        if compiler not in (None, *COMPILERS):
            raise ValueError(f"compiler={compiler!r}: expected one of {', '.join(COMPILERS)}")
        if num_layers != len(model.layers):
            raise ValueError("the compiled decode step has no speculation (MTP) layer")
        if is_quantized(model):
            raise ValueError(
                'the compiled decode step reads floating-point weights (decode_dtype="int8" '
                "quantizes them itself), not an int8-quantized model's: no int8 kernels"
            )
        why = compiler_missing()
        if why:
            raise RuntimeError(why)
        self.dtype = dtype
        self.freeze = freeze
        self.compiler = compiler
        self._digest: tuple[DecodeGraph, str] | None = None  # a graph, its weights' hash
        self._copies = 0  # weight changes copied into the graph in place
        # by graph: (padded batch, context), the context None for a graph that takes any
        self.compile_seconds: dict[tuple[int, int | None], float] = {}
        self._graph: DecodeGraph | None = None
        self._generation = -1
        self._compiled: dict[tuple[int, int | None], object] = {}
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # last step's hidden, logits
        self._pads: dict[tuple[int, int], _Padded] = {}  # the graph's input buffers, by bucket
        self._rope: tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray] | None = None

    def prepare(
        self, decode: list, prefill: list[tuple[object, int]], width: int, drafts: list[int]
    ) -> StepInput:
        """A pure-decode step is laid out straight into its bucket's padded buffers (see
        _Padded); any other step as the eager runner lays it out."""
        if prefill or width != 1 or not decode or self.device.type != "cpu":
            return super().prepare(decode, prefill, width, drafts)
        B = len(decode)
        Bp = bucket(B)
        Sp = context_bucket(Bp, max(seq.num_computed for seq in decode), self.any_context)
        cos, sin = self._rope_tables()
        pad = self._pads.get((Bp, Sp))
        if pad is None:  # a batch's context grows: its buffers for a shorter one go
            for key in [k for k in self._pads if k[0] == Bp]:
                del self._pads[key]
            pad = self._pads[(Bp, Sp)] = _Padded(Bp, Sp, self.cache.block_size, cos.shape[1])
        pad.fill(decode, cos, sin)
        ids, cos, sin, context, bias = pad.tensors
        return StepInput(
            ids=ids[:B],
            positions=pad.positions[:B],
            slots=pad.slots[:B],
            num_decode=B,
            width=1,
            decode_slots=context[:B],
            decode_bias=None,
            chunks=[],
            cos=cos[:B],
            sin=sin[:B],
            padded=pad.tensors,
        )

    def _rope_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The model's rope tables with each angle repeated for both dims of its pair (as prepare
        lays them out), fp32, as numpy views; rebuilt if the model's tables are replaced."""
        model = self.model
        if self._rope is None or self._rope[0] is not model.rope_cos:
            cos = model.rope_cos.float().repeat_interleave(2, dim=-1).contiguous()
            sin = model.rope_sin.float().repeat_interleave(2, dim=-1).contiguous()
            self._rope = (model.rope_cos, model.rope_sin, cos.numpy(), sin.numpy())
        return self._rope[2], self._rope[3]

    def handles(self, inp: StepInput) -> bool:
        return not inp.chunks and inp.width == 1 and inp.num_decode > 0

    def forward(self, inp: StepInput) -> torch.Tensor:
        self._last = None
        if not self.handles(inp):
            return super().forward(inp)
        hidden, logits = self.decode(inp)
        self._last = (hidden, logits)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The graph's own logits when asked for exactly the rows it computed, else eager's."""
        last = self._last
        if last is not None and (
            hidden is last[0] or (hidden.shape == last[0].shape and torch.equal(hidden, last[0]))
        ):
            return last[1]
        return super().logits(hidden)

    def graph(self) -> DecodeGraph:
        """The graph over the weights the engine last took (Engine._follow_weights). When they
        change (GRPO updates the policy between rollouts), the new values are copied into the
        graph's own tensors: the compiled code reads them as inputs, so nothing is recompiled. A
        graph whose tensors no longer match (another layout) is rebuilt and recompiled."""
        weights = self.weights
        if self._graph is not None and weights.generation == self._generation:
            return self._graph
        with torch.no_grad():
            kernel = MOE_KERNEL and kernels.load()
            graph = DecodeGraph(self.model, weights, self.dtype, kernel).eval()
        # frozen weights are constants of the compiled code: only a new compilation sees new ones
        in_place = not self.frozen
        if self._graph is not None and in_place and _same_tensors(self._graph, graph):
            with torch.inference_mode():
                for old, new in zip(self._graph.buffers(), graph.buffers()):
                    if old.data_ptr() != new.data_ptr():
                        old.copy_(new)
            if not self._copies:  # once: a policy being trained changes at every rollout
                log("the model's weights changed: copied into the compiled decode step")
            self._copies += 1
        else:
            if self._graph is not None:
                log("the model's weights changed: the compiled decode step is rebuilt")
            self._graph = graph
            self._compiled = {}
            self.compile_seconds = {}
        self._generation = weights.generation
        return self._graph

    @property
    def frozen(self) -> bool:
        """Whether the graph's weights are compiled in as constants."""
        if self.freeze is None:
            return bool(INDUCTOR_OPTIONS.get("freezing", False))
        return self.freeze

    @property
    def ahead_of_time(self) -> bool:
        """Whether the graph is compiled by AOTInductor into a package cached on disk."""
        return self.frozen and (self.compiler or COMPILER) == "aot"

    @property
    def any_context(self) -> bool:
        """Whether one graph per batch bucket takes any context length (AOTInductor's, exported
        with a dynamic context), rather than one per (batch, context) bucket."""
        return self.ahead_of_time

    def graph_key(self, batch: int, context: int) -> tuple[int, int | None]:
        """The compiled graph that runs a step padded to (batch, context)."""
        return (batch, None if self.any_context else context)

    def compiled(self, batch: int, context: int):
        graph = self.graph()
        key = self.graph_key(batch, context)
        if key not in self._compiled:
            if self.ahead_of_time:
                what = f"the decode step for batch {batch}, any context ({_dtype_name(self.dtype)})"
                digest = partial(self._weights_digest, graph)
                if batch < BATCHED:
                    self._compiled[key] = _Packaged(graph, digest, what)
                else:
                    variants = {
                        name: _Packaged(graph, digest, f"{what} with {name} products", options)
                        for name, options in GEMM_CHOICES.items()
                    }
                    self._compiled[key] = _Fastest(variants, what)
            else:
                self._compiled[key] = _Direct(graph)
        return self._compiled[key]

    def _weights_digest(self, graph: DecodeGraph) -> str:
        """The hash of a graph's tensors, computed once per graph (every bucket's key has it)."""
        if self._digest is None or self._digest[0] is not graph:
            self._digest = (graph, weights_digest(graph))
        return self._digest[1]

    def decode(self, inp: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
        """A pure-decode step through the compiled graph of its bucket; writes its latents to the
        cache. -> (hidden [B, d], logits [B, V]) of the real rows."""
        B = inp.num_decode
        padded = inp.padded if inp.padded is not None else _pad(inp, self.any_context)
        ids, cos, sin, context, bias = padded
        Bp, Sp = context.shape
        key = self.graph_key(Bp, Sp)
        fn = self.compiled(Bp, Sp)
        args = (ids, cos, sin, self.cache.kv, context, bias)
        first = key not in self.compile_seconds
        if first and isinstance(fn, (_Packaged, _Fastest)):
            # loaded from package_dir(), or exported, compiled and written there (_Packaged says
            # which); in inference mode or not, the export runs outside it
            start = time.perf_counter()
            try:
                hidden, logits, latents = fn(*args)
            except Exception as err:  # export or AOTInductor failed: torch.compile from now on
                warnings.warn(
                    f"AOTInductor could not compile {fn.what} ({type(err).__name__}: "
                    f"{str(err)[:300]}); compiling the decode step with torch.compile instead "
                    "(static context buckets, not cached)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiler = "jit"
                del self._compiled[key]
                widened = _widen(padded, context_bucket(Bp, Sp, self.any_context))
                return self.decode(dataclasses.replace(inp, padded=widened))
            self.compile_seconds[key] = time.perf_counter() - start
        elif first:
            # Inductor's cache keeps no graph with frozen weights (constants): those compile at
            # every start; weights as inputs come from the cache in seconds after the first time
            when = "at every start" if self.frozen else "the first time, cached afterwards"
            log(
                f"compiling the decode step for batch {Bp}, context {Sp} ({_dtype_name(self.dtype)}"
                f"): up to about a minute {when}"
            )
            start = time.perf_counter()
            # the first call compiles; each bucket is a recompilation of one forward, hence the
            # limits. Freezing must be on while Dynamo traces, not only in Inductor's options:
            # otherwise the weights reach the graph as inputs and max-autotune has no constants
            # to pack for its C++ GEMM templates
            limits = dict(recompile_limit=64, accumulated_recompile_limit=4096)
            freezing = torch._inductor.config.patch(freezing=self.frozen)
            with torch._dynamo.config.patch(**limits), freezing, warnings.catch_warnings():
                warnings.filterwarnings("ignore", "TypedStorage is deprecated")  # Inductor's own
                hidden, logits, latents = fn(*args)
            seconds = time.perf_counter() - start
            self.compile_seconds[key] = seconds
            log(
                f"compiled the decode step for batch {Bp}, context {Sp} ({_dtype_name(self.dtype)})"
                f" in {seconds:.1f} s "
                + (
                    "(frozen weights: not cached)"
                    if self.frozen
                    else f"(cached in {inductor_cache_dir()})"
                )
            )
        else:
            hidden, logits, latents = fn(*args)
        self.cache.kv.index_copy_(1, inp.slots, latents[:, :B] if B < Bp else latents)
        if B < Bp:
            hidden = hidden[:B]
            logits = logits[:B]
        dtype = self.model.embed_tokens.weight.dtype
        return (hidden if hidden.dtype == dtype else hidden.to(dtype)), logits


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """Whether two graphs hold tensors of the same names, shapes and dtypes, in the same order."""
    one = [(n, t.shape, t.dtype) for n, t in a.named_buffers()]
    return one == [(n, t.shape, t.dtype) for n, t in b.named_buffers()]


def _inductor(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """Inductor over Dynamo's graph, as torch.compile(options=INDUCTOR_OPTIONS) runs it, with
    freezing as the runner set it around the tracing call (CompiledRunner.decode)."""
    from torch._inductor.compile_fx import compile_fx

    options = {**INDUCTOR_OPTIONS, "freezing": bool(torch._inductor.config.freezing)}
    return compile_fx(gm, example_inputs, config_patches=options)


class _Direct:
    """One bucket's graph, compiled by torch.compile and then called without Dynamo.

    The first call goes through torch.compile (Dynamo traces the graph, Inductor compiles it, or
    loads it from its on-disk cache) with a backend that keeps what Inductor returns and the
    inputs it was compiled for: the graph's weights (the same tensors at every call) and the step's
    inputs. The runner passes the same tensors at every step of a bucket (its padded buffers and the
    cache pool, written in place), so later calls hand Inductor's function that same input list
    directly: no guard evaluation, no frame hook, no module call. Guards would only re-check what
    cannot change here (the tensors are the same objects, shapes fixed by the bucket, the weights
    frozen: a weight change builds a new graph); any call with other tensors goes through Dynamo.
    """

    def __init__(self, graph: DecodeGraph):
        self.captured: tuple[object, list] | None = None  # the compiled fn, its last inputs
        self.direct: tuple[object, list, tuple] | None = None  # fn, its inputs, the step's args
        self.dynamo = torch.compile(graph, backend=self._backend, dynamic=False, fullgraph=True)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list):
        fn = _inductor(gm, example_inputs)
        self.direct = None

        def recorded(*args):  # what Dynamo's frame hands the compiled function at a call
            self.captured = (fn, list(args))
            return fn(*args)

        return recorded

    def __call__(self, *args: torch.Tensor):
        direct = self.direct
        if direct is not None and all(a is b for a, b in zip(args, direct[2])):
            return tuple(direct[0](*direct[1]))
        self.captured = None
        out = self.dynamo(*args)
        self._arm(args, out)
        return out

    def _arm(self, args: tuple, out) -> None:
        """After a call through Dynamo: call directly from now on if every input that the compiled
        function was handed is a weight or one of these args, and it returned the three
        outputs."""
        captured = self.captured
        self.captured = None
        if captured is None or not (isinstance(out, tuple) and len(out) == 3):
            return
        fn, inputs = captured
        if not all(isinstance(t, torch.Tensor) for t in inputs):
            return
        if not {id(a) for a in args} <= {id(t) for t in inputs}:
            return
        self.direct = (fn, inputs, args)


class _Packaged:
    """One batch bucket's graph compiled ahead of time by AOTInductor, for any context length (the
    context's length is a dynamic dimension of the exported graph), its package cached on disk.

    The first call looks for the package of this graph and these inputs in package_dir() (named by
    package_key: the weights' hash, the inputs' shapes and dtypes but the context's length, the
    graph's settings, the traced code, the compile options, torch's version, the CPU and the thread
    count) and loads it; failing that, it exports the graph (torch.export), compiles it with
    INDUCTOR_OPTIONS (frozen: the weights are constants, packed for the C++ GEMM templates, inside
    the package), writes the package to a temporary file renamed into place (a reader never sees
    half a package; two processes compiling the same key both write whole ones) and loads it. A
    package that fails to load (truncated or corrupt: its zip's CRCs are checked first) is compiled
    again, with a warning. Later calls hand the step's tensors to the loaded model: no Python,
    guards or per-call constant handles between kernels."""

    def __init__(self, graph: DecodeGraph, digest, what: str, options: dict | None = None):
        self.graph = graph
        self.digest = digest  # () -> the hash of the graph's weights
        self.what = what  # "the decode step for batch ..., any context (dtype)", for the log
        self.options = {**INDUCTOR_OPTIONS, **(options or {})}  # Inductor's, for this package
        self.path: str | None = None  # the package, once found or written
        self.source: str | None = None  # "cache" or "compiled", once loaded
        self.run = None  # the loaded model's run: a list of the step's tensors -> the outputs

    def __call__(self, *args: torch.Tensor):
        run = self.run
        if run is None:
            run = self._load_or_compile(args)
        return tuple(run(list(args)))

    def key(self, args: tuple) -> str:
        """The name of this graph's package for these inputs (package_key)."""
        return package_key(self.graph, self.digest(), args, True, self.options)

    def cached_path(self, args: tuple) -> str:
        """Where this graph's package for these inputs is kept in package_dir()."""
        return os.path.join(package_dir(), self.key(args) + ".pt2")

    def _load_or_compile(self, args: tuple):
        start = time.perf_counter()
        folder = package_dir()
        path = self.cached_path(args)
        if os.path.exists(path):
            try:
                self.run = _load_package(path)
            except Exception as err:  # truncated, corrupt, written by another build
                warnings.warn(
                    f"the cached {self.what} in {path} cannot be loaded ({type(err).__name__}: "
                    f"{str(err)[:200]}); compiling it again",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _remove(path)
            else:
                _touch(path)
                self.path = path
                self.source = "cache"
                log(f"loaded {self.what} from {path} in {time.perf_counter() - start:.1f} s")
                return self.run
        log(f"compiling {self.what}: up to about a minute the first time, cached afterwards")
        try:  # the folder is writable (probed first: an Inductor error is not an unwritable folder)
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:  # it is not: compile, but only for this process
            warnings.warn(
                f"cannot write to {folder} ({err}); the decode step is compiled without caching",
                RuntimeWarning,
                stacklevel=2,
            )
            path = os.path.join(_scratch_dir(), os.path.basename(path))
            self._compile(args, path)
        else:
            # AOTInductor wants a name ending in .pt2; _prune clears stale ".tmp.pt2" temporaries
            with atomic_file(path, suffix=".tmp.pt2") as tmp:
                self._compile(args, str(tmp))
        self.run = _load_package(path)
        self.path = path
        self.source = "compiled"
        log(
            f"compiled {self.what} in {time.perf_counter() - start:.1f} s (cached in "
            f"{os.path.dirname(path)})"
        )
        _prune(folder, PACKAGES_KEPT)
        return self.run

    def _compile(self, args: tuple, path: str) -> None:
        """Export the graph over copies of the step's tensors (outside inference mode, which
        export does not trace under) and compile it into a package at path."""
        options = {k: v for k, v in self.options.items() if k != "cpp_wrapper"}  # AOT's own
        options["freezing"] = True
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")  # Inductor's own
            warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)  # torch's pytree
            example = tuple(a.clone() for a in args)
            # (ids, cos, sin, kv, context [B, S], bias [B, S + 1]): S any length up to the cache's
            context = torch.export.Dim("context", min=2, max=args[3].shape[1] + CONTEXT_STEP)
            dynamic = (None, None, None, None, {1: context}, {1: context + 1})
            program = torch.export.export(self.graph, example, dynamic_shapes=dynamic, strict=False)
            _drop_dtype_asserts(program)
            torch._inductor.aoti_compile_and_package(
                program, package_path=path, inductor_configs=options
            )


class _Fastest:
    """One batch bucket compiled in several ways (GEMM_CHOICES, each a _Packaged), of which the one
    whose graph runs the bucket's step fastest is kept: a choice by timing the whole graph on this
    machine, not its products alone (max-autotune's). The first call loads or compiles every
    variant, times them on that step's own tensors (ROUNDS interleaved rounds of CALLS calls, the
    best of each) and records the winner beside the packages, so that a later process with the same
    packages loads that one only and computes the same logits as the first. The variants compute
    the same step; their kernels differ, and so may their last bits."""

    ROUNDS = 5
    CALLS = 3

    def __init__(self, variants: dict[str, _Packaged], what: str):
        self.variants = variants
        self.what = what  # "the decode step for batch ..., any context (dtype)", for the log
        self.chosen: str | None = None  # the variant that runs, once chosen
        self.seconds: dict[str, float] = {}  # a call's time by variant, when timed in this process

    @property
    def path(self) -> str | None:
        return self.variants[self.chosen].path if self.chosen else None

    @property
    def source(self) -> str | None:
        return self.variants[self.chosen].source if self.chosen else None

    def __call__(self, *args: torch.Tensor):
        if self.chosen is None:
            self._choose(args)
        return self.variants[self.chosen](*args)

    def _choose(self, args: tuple) -> None:
        keys = sorted(v.key(args) for v in self.variants.values())
        record = os.path.join(package_dir(), _digest_of(keys) + ".choice")
        chosen = _read_choice(record)
        if chosen in self.variants:
            if os.path.exists(self.variants[chosen].cached_path(args)):
                self.chosen = chosen
                _touch(record)
                log(f"{self.what}: {chosen} products, as timed before ({record})")
                return
        for name, variant in list(self.variants.items()):
            try:
                variant(*args)  # loaded, or compiled
            except Exception as err:  # the others may still compile: this one is left out
                if len(self.variants) == 1:
                    raise
                warnings.warn(
                    f"AOTInductor could not compile {variant.what} ({type(err).__name__}: "
                    f"{str(err)[:300]}); timing the others",
                    RuntimeWarning,
                    stacklevel=2,
                )
                del self.variants[name]
        inputs = list(args)
        best = dict.fromkeys(self.variants, float("inf"))
        for _ in range(self.ROUNDS):
            for name, variant in self.variants.items():
                start = time.perf_counter()
                for _ in range(self.CALLS):
                    variant.run(inputs)
                best[name] = min(best[name], (time.perf_counter() - start) / self.CALLS)
        self.seconds = best
        self.chosen = min(best, key=best.get)
        for name, variant in self.variants.items():
            if name != self.chosen:
                variant.run = None  # its loaded model (and its copy of the weights) freed
        times = ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in best.items())
        log(f"{self.what}: a call with {times}: keeping {self.chosen}")
        try:
            with atomic_file(record) as tmp:
                tmp.write_text(self.chosen)
        except OSError:  # an unwritable folder: the next process times them again
            pass


def _digest_of(parts: list[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _read_choice(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _drop_dtype_asserts(program: torch.export.ExportedProgram) -> None:
    """Remove the dtype checks that export puts after each `.to()` (they compute nothing). On an
    int8 weight, `w.t().to(bfloat16)`, one would be a second user of the transpose, and freezing's
    constant folding would then fold the conversion: bf16 weights in the package, not int8."""
    graph = program.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
    program.graph_module.recompile()


def package_dir() -> str:
    """Where the decode step's AOTInductor packages are cached: beside Inductor's own cache."""
    return os.path.join(inductor_cache_dir(), "nanoseek_decode")


@cache
def _scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="nanoseek_decode_")


def weights_digest(graph: nn.Module) -> str:
    """sha256 over a graph's tensors: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in (*graph.named_parameters(), *graph.named_buffers()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
        flat = t.detach().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return h.hexdigest()


def package_key(
    graph: nn.Module,
    digest: str,
    args: tuple,
    any_context: bool = False,
    options: dict | None = None,
) -> str:
    """A package's name: what its compiled code depends on besides the weights' hash `digest`:
    the inputs' shapes and dtypes (the bucket and the cache pool; with any_context, the context's
    length, the last dimension of the last two inputs, left out), every setting the graph's
    modules hold (heads, ranks, norms' eps, the router's), the source of the modules it traces,
    the compile options (INDUCTOR_OPTIONS unless given), torch's version, this CPU's instruction
    sets and the thread count (the C++ GEMM templates split their work for it: `num_threads` is a
    constant of the compiled code, so a package built for one thread runs its products on one
    thread in a process with two)."""
    settings = [
        (type(m).__name__, sorted((k, repr(v)) for k, v in vars(m).items() if _plain(v)))
        for m in graph.modules()
    ]
    shapes = [list(a.shape) for a in args]
    if any_context:
        shapes[-2][-1] = shapes[-1][-1] = "context"
    h = hashlib.sha256()
    for part in (
        "nanoseek decode package 2",
        digest,
        repr([(shape, str(a.dtype)) for shape, a in zip(shapes, args)]),
        repr(settings),
        repr(sorted((INDUCTOR_OPTIONS if options is None else options).items())),
        torch.__version__,
        cpu_signature(),
        f"threads {torch.get_num_threads()}",
        _traced_code(),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:32]


def _plain(v: object) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, list, tuple))


@cache
def cpu_signature() -> str:
    """This CPU's instruction sets, as the kernels compiled for it depend on them."""
    flags = " ".join(sorted(cpu_flags())) or platform.processor()
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {flags}"


@cache
def _traced_code() -> str:
    """The source of the modules whose code the graph runs, the CPU kernels' included."""
    h = hashlib.sha256()
    for path in (sys.modules[__name__].__file__, moe.__file__, attention.__file__, kernels.SOURCE):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _load_package(path: str):
    """A package's loaded model's run, after its zip's CRCs check (a package cut short or damaged
    fails here, not in the loader)."""
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"{bad} fails its CRC check")
    return torch._inductor.aoti_load_package(path).loader.run


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _touch(path: str) -> None:
    """Mark a package used (the pruning keeps the most recently used)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _prune(folder: str, keep: int) -> None:
    """Delete the least recently used packages beyond `keep`, and as many of the records of which
    package to run (_Fastest's), and temporary files a crashed compilation left over a day ago."""
    try:
        entries = [e for e in os.scandir(folder) if e.name.endswith((".pt2", ".choice"))]
    except OSError:
        return
    now = time.time()
    packages = []
    choices = []
    for e in entries:
        try:
            mtime = e.stat().st_mtime
        except OSError:
            continue
        if e.name.endswith(".tmp.pt2"):
            if now - mtime > 86400:
                _remove(e.path)
        else:
            (choices if e.name.endswith(".choice") else packages).append((mtime, e.path))
    for group in (packages, choices):
        for _, path in sorted(group, reverse=True)[keep:]:
            _remove(path)


class _Padded:
    """One bucket's graph inputs, kept between steps: ids, cos, sin [Bp], context [Bp, Sp] (the
    cache rows before each token) and bias [Bp, Sp + 1] (0 where a row may attend, -inf elsewhere;
    the last column, the token itself, 0), plus the real rows' positions and slots. Written through
    numpy views of the same memory. A row's context and bias depend only on its position and its
    blocks: a row one position further than at its last fill, over the same blocks (the sequence
    moved one token), only gains one context column; any other row is rebuilt. Padded rows attend
    to themselves only."""

    def __init__(self, Bp: int, Sp: int, block_size: int, rope_width: int):
        self.block_size = block_size
        self.Sp = Sp
        ids = torch.zeros(Bp, dtype=torch.long)
        cos = torch.zeros(Bp, rope_width)
        sin = torch.zeros(Bp, rope_width)
        context = torch.zeros(Bp, Sp, dtype=torch.long)
        bias = torch.full((Bp, Sp + 1), float("-inf"))
        bias[:, Sp] = 0.0
        self.positions = torch.zeros(Bp, dtype=torch.long)
        self.slots = torch.zeros(Bp, dtype=torch.long)
        self.tensors = (ids, cos, sin, context, bias)
        self._ids = ids.numpy()
        self._context = context.numpy()
        self._bias = bias.numpy()
        self._positions = self.positions.numpy()
        self._slots = self.slots.numpy()
        self._cos = cos.numpy()
        self._sin = sin.numpy()
        # what each row was last filled for: (computed tokens, their blocks) or None (padding)
        self.rows: list[tuple | None] = [None] * Bp

    def fill(self, decode: list, cos_table: np.ndarray, sin_table: np.ndarray) -> None:
        bs = self.block_size
        for i, seq in enumerate(decode):
            n = seq.num_computed  # the new token's position; the cache holds positions < n
            table = seq.block_table
            self._ids[i] = seq.token_ids[-1]
            self._positions[i] = n
            self._slots[i] = table[n // bs] * bs + n % bs
            held = self.rows[i]
            nb = -(-n // bs)  # blocks of positions < n
            if (
                held is not None
                and held[0] == n - 1
                and len(held[1]) <= nb
                and held[1] == table[: len(held[1])]
            ):  # one more column
                self._context[i, n - 1] = table[(n - 1) // bs] * bs + (n - 1) % bs
                self._bias[i, n - 1] = 0.0
            else:
                pos = np.arange(n)
                self._context[i, :n] = np.asarray(table[:nb], dtype=np.int64)[pos // bs] * bs + (
                    pos % bs
                )
                self._context[i, n:] = 0
                self._bias[i, :n] = 0.0
                self._bias[i, n : self.Sp] = float("-inf")
            self.rows[i] = (n, table[:nb])
        for i in range(len(decode), len(self.rows)):
            if self.rows[i] is not None:  # a row that held a sequence now pads
                self._ids[i] = 0
                self._positions[i] = 0
                self._cos[i] = 0.0
                self._sin[i] = 0.0
                self._context[i] = 0
                self._bias[i, : self.Sp] = float("-inf")
                self.rows[i] = None
        B = len(decode)
        np.take(cos_table, self._positions[:B], axis=0, out=self._cos[:B])
        np.take(sin_table, self._positions[:B], axis=0, out=self._sin[:B])


def _pad(inp: StepInput, any_context: bool) -> tuple[torch.Tensor, ...]:
    """The graph's padded inputs of a decode step laid out by the eager runner's prepare."""
    B = inp.num_decode
    S = inp.decode_slots.shape[1] - 1  # cache rows before the newest token
    Bp = bucket(B)
    Sp = context_bucket(Bp, S, any_context)
    dev = inp.ids.device
    context = torch.zeros(Bp, Sp, dtype=torch.long, device=dev)
    context[:B, :S] = inp.decode_slots[:, :S]
    bias = torch.full((Bp, Sp + 1), float("-inf"), device=dev)
    bias[:, Sp] = 0.0
    before = torch.arange(Sp, device=dev) < inp.positions[:B, None]
    bias[:B, :Sp].masked_fill_(before, 0.0)
    ids = F.pad(inp.ids, (0, Bp - B))
    cos = F.pad(inp.cos.float(), (0, 0, 0, Bp - B))
    sin = F.pad(inp.sin.float(), (0, 0, 0, Bp - B))
    return ids, cos, sin, context, bias


def _widen(padded: tuple[torch.Tensor, ...], Sp: int) -> tuple[torch.Tensor, ...]:
    """A step's padded inputs with the context widened to Sp rows, the new ones masked."""
    ids, cos, sin, context, bias = padded
    extra = Sp - context.shape[1]
    context = F.pad(context, (0, extra))
    bias = torch.cat((F.pad(bias[:, :-1], (0, extra), value=float("-inf")), bias[:, -1:]), 1)
    return ids, cos, sin, context, bias


def inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------- choosing a path at start
DECODE_PATHS = ("auto", "eager", "compiled")
# the compiled graph's matrices: "int8" is weight-only int8 for the dense products, the LM head and
# the routed experts (bf16 activations; the absorbed attention's per-head products in bf16), taken
# only when asked for: "auto" compares float32 and, where the CPU has it, bfloat16
DECODE_DTYPES = ("auto", "float32", "bfloat16", "int8")
# the decode path of an Engine built without one (decode=None); unset: "auto"
DECODE_ENV = "NANOSEEK_DECODE"


def resolve_decode(decode: str | None) -> str:
    """An Engine's decode option -> the path asked for: decode itself when given, else
    $NANOSEEK_DECODE when set (checked), else "auto"."""
    if decode is not None:
        return decode
    value = os.environ.get(DECODE_ENV, "").strip()
    if not value:
        return "auto"
    if value not in DECODE_PATHS:
        raise ValueError(
            f"{DECODE_ENV}={value!r}: expected one of {', '.join(DECODE_PATHS)} (or unset: auto)"
        )
    return value


def choose_runner(
    model: Transformer,
    cache: LatentCache,
    num_layers: int,
    decode: str | None,
    decode_dtype: str,
    freeze: bool | None = None,
) -> ModelRunner:
    """The runner the Engine options ask for: decode "eager" | "compiled" | "auto" (None: see
    resolve_decode), decode_dtype "auto" | "float32" | "bfloat16" | "int8" (the compiled graph's
    matrices, DECODE_DTYPES). "auto" times a batch-1 decode step of every candidate and keeps the
    fastest; the choice is printed. A compiled path that cannot run falls back to eager with one
    warning. "auto" decodes eager on a model that is not on the CPU (the compiled step is built
    for it). freeze: the compiled graph's weights frozen (None: INDUCTOR_OPTIONS["freezing"]) or
    graph inputs that a weight change is copied into (CompiledRunner)."""
    decode = resolve_decode(decode)
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode={decode!r}: expected 'auto', 'eager' or 'compiled'")
    if decode_dtype not in DECODE_DTYPES:
        raise ValueError(
            f"decode_dtype={decode_dtype!r}: expected one of {', '.join(DECODE_DTYPES)}"
        )
    eager = ModelRunner(model, cache, num_layers)
    if decode == "eager":
        return eager
    if num_layers != len(model.layers):
        log(
            "decode path: eager (speculative decoding verifies two tokens a step: no compiled "
            "step for that)"
        )
        return eager
    if decode == "auto" and eager.device.type != "cpu":
        log(
            f"decode path: eager (the model is on {eager.device.type}; the compiled step is "
            "for CPU)"
        )
        return eager
    if decode_dtype == "auto":
        dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16(torch.device("cpu")) else [])
    else:
        dtypes = [getattr(torch, decode_dtype)]
    try:
        candidates = {
            f"compiled {_dtype_name(d)}": CompiledRunner(model, cache, num_layers, d, freeze)
            for d in dtypes
        }
        if decode == "compiled" and len(candidates) == 1:
            runner = next(iter(candidates.values()))
            # compile now, so that a failure falls back here; in inference mode, as Engine.step runs
            with torch.inference_mode():
                runner.decode(_probe_input(runner))
            log(f"decode path: {next(iter(candidates))} (forced)")
            return runner
        if decode == "auto":
            candidates["eager"] = eager
        times = {name: _time_step(r) for name, r in candidates.items()}
    except Exception as err:  # no compiler, an Inductor failure, an int8 model: eager is right
        warnings.warn(
            f"the compiled decode step is unavailable ({type(err).__name__}: "
            f"{str(err)[:300]}); decoding runs eager",
            RuntimeWarning,
            stacklevel=3,
        )
        return eager
    best = min(times, key=times.get)
    summary = ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in times.items())
    log(f"decode path: {best} (batch-1 step: {summary})")
    return candidates[best]


def _probe_input(runner: ModelRunner, length: int = 32) -> StepInput:
    """A batch-1 decode step at position `length` over the pool's first blocks (garbage latents:
    the step is only timed; nothing reads those rows before a real sequence writes them)."""
    length = min(length, runner.cache.capacity_tokens - 1)
    bs = runner.cache.block_size
    seq = SimpleNamespace(
        token_ids=[0] * (length + 1), num_computed=length, block_table=list(range(length // bs + 1))
    )
    return runner.prepare([seq], [], 1, [])


@torch.inference_mode()
def _time_step(runner: ModelRunner, rounds: int = 5, steps: int = 8) -> float:
    """Best-of-rounds seconds per batch-1 decode step (the first call compiles: not timed)."""
    inp = _probe_input(runner)

    def step(inp: StepInput) -> torch.Tensor:
        return runner.logits(runner.forward(inp))

    step(inp)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step(inp)
        best = min(best, (time.perf_counter() - start) / steps)
    return best
