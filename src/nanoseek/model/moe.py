"""DeepSeekMoE: shared experts plus fine-grained routed experts, dropless.

Routing (V3): sigmoid affinities; a per-expert bias, trained by the balancing rule rather than by
gradients, shifts which experts are *selected* but never the weights; experts come in groups and a
token may use only the top `topk_group` groups (a group scores the sum of its two best experts). V2
routing (softmax, group max) is kept for DeepSeek-V2 checkpoints.

Dispatch: the (token, expert) pairs are sorted by expert so each expert's tokens form one
contiguous slice, all experts run as one grouped matmul (or a loop over the non-empty experts), and
the outputs go back to token order by the inverse permutation and are summed, weighted. No
capacity, nothing dropped. Under autocast the grouped matmul runs in the autocast dtype; under
torch.compile on CPU it is the custom op `cpu_grouped_mm` (Inductor cannot lower F.grouped_mm
there), which computes the same numbers. In bf16 on CPU the op runs eagerly too, its products split
so that their shapes repeat from step to step (`_grouped_mm_few_shapes`: oneDNN builds a kernel for
each new shape).

This is the one copy of routing and of the expert loop. The engine (engine/weights.py, weights
stored [in, out]) and the int8 experts (engine/quant.py) call `Router.route`, `dispatch` and
`run_experts` and supply only their matrices or "run expert e on these rows". One token decoding
alone takes the fast variants beside them, `Router.route_one` and `dispatch_one` (no tiny tensor
ops, no sorting), which tests/test_model.py checks against the tensor path. The compiled decode
step (engine/compiled.py) takes `dispatch_gathered`: every shape fixed by the batch and top-k, no
data-dependent sizes, so routing and experts stay in one graph (tests/test_engine_compiled.py
checks it against `dispatch`). Larger batches read each expert's weights once instead of once per
pair: `dispatch_dense` (every expert on every token, unchosen ones weighted 0: two plain products)
while the pairs are a few times the experts, `dispatch_sorted` (the pairs sorted by expert, one
grouped product per matrix, every shape still static) beyond, where computing every expert for
every token costs more than the grouped products' per-expert calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import MLP


class Router(nn.Module):
    """Which experts a token uses, and with what weights: `route` (tensors, any number
    of tokens) and `route_one` (Python, one token). The engine keeps its own copy of
    the weight and calls both on its logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.sigmoid = cfg.scoring_func == "sigmoid"
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.sigmoid:  # V3's balancing bias: fp32, selection only, updated outside autograd
            bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
            self.register_buffer("e_score_correction_bias", bias)

    def _apply(self, fn, recurse=True):
        # The bias stays fp32 whatever dtype the model is cast to (bf16
        # would round away updates of size γ).
        bias = getattr(self, "e_score_correction_bias", None)
        super()._apply(fn, recurse)
        if bias is not None:
            device = self.weight.device
            if bias.is_meta or device.type == "meta":
                bias = torch.empty(bias.shape, dtype=torch.float32, device=device)
            else:
                bias = bias.to(device=device, dtype=torch.float32)
            self.e_score_correction_bias = bias
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> weights [N, K], expert ids [N, K], affinities [N, E] (fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions are made in fp32
            logits = F.linear(x.float(), self.weight.float())
        return self.route(logits, self.e_score_correction_bias if self.sigmoid else None)

    def route(
        self, logits: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 logits [N, E] and the selection bias [E] (None for softmax routing)
        -> weights [N, K], expert ids [N, K], affinities [N, E]."""
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        choice = scores if bias is None else scores + bias
        if choice.requires_grad:  # the choice is discrete: no gradient goes through it
            choice = choice.detach()
        if self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))
            if torch.compiler.is_compiling():
                dropped = self.dropped_groups_fused(grouped)
            else:
                dropped = self.dropped_groups(grouped)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)  # the unbiased affinities
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids, scores

    def dropped_groups(self, grouped: torch.Tensor) -> torch.Tensor:
        """`route`'s group limit: the selection scores [N, G, E/G] -> which groups are dropped
        [N, G]. A group scores the sum of its two best affinities (sigmoid, V3) or its best
        (softmax, V2); the topk_group best groups are kept."""
        if self.sigmoid:
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(-1)
        keep = group_score.topk(self.topk_group, dim=-1).indices
        return torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)

    def dropped_groups_fused(self, grouped: torch.Tensor) -> torch.Tensor:
        """`dropped_groups` for compiled code: the same groups as its two topk calls decide, by
        elementwise passes and small reductions that Inductor fuses (a topk it calls opaquely).
        A group's score, the sum of its two best, is its best plus the best of the rest (the same
        two floats added); the kept groups rank below topk_group, ties to the lower index.
        tests/test_model.py checks it against `dropped_groups`. Eager, it would be the slower:
        more, smaller ops."""
        best = grouped.amax(-1)
        if self.sigmoid:
            rest = grouped.scatter(-1, grouped.argmax(-1, keepdim=True), float("-inf"))
            best = best + rest.amax(-1)
        return _rank(best) >= self.topk_group

    def route_one(
        self, logits: torch.Tensor, bias: list[float] | None
    ) -> tuple[list[int], list[float]]:
        """`route` for a single token (logits [1, E], the bias as a list), decided in Python on its
        E scores: when decoding one sequence, a dozen tiny tensor ops cost more than the arithmetic.
        The same ids in the same order and the same weights (tests/test_model.py checks).
        -> (expert ids, weights)."""
        scores = (logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1))[0].tolist()
        choice = scores if bias is None else [s + b for s, b in zip(scores, bias)]
        experts = range(self.n_experts)
        if self.n_group > 1:
            size = self.n_experts // self.n_group
            groups = [choice[g * size : (g + 1) * size] for g in range(self.n_group)]
            group_score = [sum(sorted(grp)[-2:]) if self.sigmoid else max(grp) for grp in groups]
            keep = sorted(range(self.n_group), key=lambda g: -group_score[g])[: self.topk_group]
            experts = [e for g in keep for e in range(g * size, (g + 1) * size)]
        ids = sorted(experts, key=lambda e: -choice[e])[: self.top_k]
        weights = [scores[e] for e in ids]
        if self.norm_topk_prob:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        return ids, [w * self.scaling for w in weights]


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """scores [N, G] -> each one's place when its row is sorted best first [N, G] (0 = best),
    ties going to the lower index, as a stable sort (and `Router.route_one`) orders them."""
    s = scores.unsqueeze(-1)  # [N, G, 1]: this one
    other = scores.unsqueeze(-2)  # [N, 1, G]: every other one
    index = torch.arange(scores.shape[-1], device=scores.device)
    earlier = index.unsqueeze(0) < index.unsqueeze(1)  # [G, G]: other's index below this one's
    return ((other > s) | ((other == s) & earlier)).sum(-1)


# ------------------------------------------------------------- dispatch: the expert loop, once
RunSorted = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows sorted by expert, counts)
RunOne = Callable[[int, torch.Tensor], torch.Tensor]  # (expert e, its rows)


def dispatch(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, n_experts: int, run: RunSorted
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k weights[:, k] · expert_{ids[:, k]}(x), dropless. x [N, d], weights and ids [N, K].

    The N·K (token, expert) pairs are sorted by expert, `run(rows, counts)` computes every expert
    on its contiguous slice of rows (counts [E] rows per expert; `run_experts` does it), and the
    outputs go back to (token, k) order by the inverse permutation and are summed per token,
    weighted.
    Permutations both ways, never a scatter-add: a compiled index_add runs with atomic adds, which
    on two CPU threads took longer than on one. -> (output [N, d], counts)."""
    n, k = ids.shape
    flat = ids.flatten()
    # rather than bincount, whose output size depends on the data (a graph break when compiled)
    counts = torch.zeros(n_experts, dtype=flat.dtype, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    order = flat.argsort(stable=True)
    inverse = _inverse(order)
    pairs = x.unsqueeze(1).expand(n, k, x.shape[-1]).reshape(n * k, -1)  # row i·K + j: token i
    ys = run(permute_rows(pairs, order, inverse), counts)
    ys = permute_rows(ys, inverse, order).view(n, k, -1)
    return (ys * weights.unsqueeze(-1).type_as(ys)).sum(1), counts


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of the permutation perm [M]: one scatter rather than a second sort."""
    places = torch.arange(perm.shape[0], device=perm.device, dtype=perm.dtype)
    return torch.empty_like(perm).scatter_(0, perm, places)


class _PermuteRows(torch.autograd.Function):
    """rows[perm] whose gradient is the gradient's rows[inverse]: a gather both ways."""

    @staticmethod
    def forward(rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return rows.index_select(0, perm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """rows [M, ...] reordered by the permutation perm (inverse: its inverse), differentiably
    without a scatter."""
    return _PermuteRows.apply(rows, perm, inverse)


def dispatch_one(
    x: torch.Tensor, ids: list[int], weights: list[float], expert: RunOne, out: torch.Tensor
) -> torch.Tensor:
    """`dispatch` for one token x [1, d] routed by `Router.route_one`: its K experts run
    in turn, nothing to sort; their weighted outputs are added to out [1, d] in place
    (the engine passes the shared experts')."""
    for e, w in zip(ids, weights):
        out.add_(expert(e, x), alpha=w)
    return out


def dispatch_gathered(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dispatch` with every shape static: each token's K experts' matrices are gathered by id and
    run as batched matrix-vector products. x [N, d], weights and ids [N, K], the stacked matrices
    as x @ W (gate_up [E, d, 2I], gate then up; down [E, I, d]) -> Σ_k weights[:, k] ·
    expert_{ids[:, k]}(x) [N, d]. Reads N·K experts' weights, so it suits a few decode tokens.
    With scales (weight-only int8 matrices, one scale per expert and output column: [E, 2I] and
    [E, d]), the gathered rows are converted to the scales' dtype, x's too, and each product is
    scaled by its expert's scales."""
    n, k = ids.shape
    flat = ids.flatten()

    def product(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if scale is None:
            return torch.bmm(a, w.index_select(0, flat))
        return torch.bmm(a, w.index_select(0, flat).to(scale.dtype)) * scale[flat].unsqueeze(1)

    if gate_up_scale is not None:
        x = x.to(gate_up_scale.dtype)
    xs = x.unsqueeze(1).expand(n, k, x.shape[-1]).reshape(n * k, 1, x.shape[-1])
    gate, up = product(xs, gate_up, gate_up_scale).chunk(2, dim=-1)
    ys = product(F.silu(gate) * up, down, down_scale).view(n, k, -1)
    return (ys * weights.unsqueeze(-1).to(ys.dtype)).sum(1)


def dispatch_dense(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """`dispatch` as two plain matrix products, for batches whose (token, expert) pairs far
    outnumber the experts: every expert runs on every token, its SwiGLU output scaled by the
    token's routing weight (0 for the experts it did not choose) before the down product, so the
    products over all experts at once are [N, d] x [d, E·2I] and [N, E·I] x [E·I, d]. Computes
    E/K times the pairs' work but reads each expert's weights once, in two large products instead
    of 2·E small ones. Same arguments and result as `dispatch_gathered`."""
    n = x.shape[0]
    E, d, two_inner = gate_up.shape
    routing = torch.zeros(n, E, dtype=x.dtype, device=x.device).scatter(1, ids, weights.to(x.dtype))
    # [E, d, 2I] seen as [d, E·2I]: a view when the matrices are held [E, 2I, d] (x @ W views)
    g = torch.mm(x, gate_up.permute(1, 0, 2).reshape(d, E * two_inner)).view(n, E, two_inner)
    gate, up = g.chunk(2, dim=-1)
    h = F.silu(gate) * up * routing.unsqueeze(-1)
    return torch.mm(h.reshape(n, -1), down.reshape(-1, down.shape[-1]))


def dispatch_sorted(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """`dispatch` with every shape static, for many tokens: the N·K (token, expert) pairs sorted by
    expert, every expert run on its own pairs only by one grouped product per matrix (each pair
    computed once, each expert's weights read once), the outputs put back in pair order by the
    inverse permutation and summed per token, weighted. Same arguments and result as
    `dispatch_gathered`. Counts by comparison rather than bincount or index_add (data-dependent
    sizes, or no compiled kernel), so that the whole of it lowers into one compiled graph."""
    n, k = ids.shape
    flat = ids.flatten()
    experts = torch.arange(gate_up.shape[0], device=ids.device)
    counts = (flat.unsqueeze(1) == experts).sum(0)
    order = flat.argsort(stable=True)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:  # shapes grouped_mm cannot take
        gate, up = (rows @ gate_up[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ down[e]

    ys = run_experts(x.index_select(0, order // k), counts, expert, gate_up, down)
    ys = ys.index_select(0, order.argsort()).view(n, k, -1)  # back in (token, k) order
    return (ys * weights.unsqueeze(-1).to(ys.dtype)).sum(1)


def run_experts(
    xs: torch.Tensor,
    counts: torch.Tensor,
    expert: RunOne,
    gate_up: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
) -> torch.Tensor:
    """xs [M, d], rows sorted by expert, counts [E] rows per expert -> each row through its expert.

    With the stacked matrices as x @ W (gate_up [E, d, 2I], gate then up; down [E, I, d]) and
    `grouped_mm_ok`: one grouped matmul per matrix for all experts. Otherwise `expert(e, rows)` on
    each non-empty slice."""
    if gate_up is not None and grouped_mm_ok(xs, gate_up) and _rows_aligned(gate_up, down):
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = _grouped_mm(xs, gate_up, offsets).chunk(2, dim=-1)
        return _grouped_mm(F.silu(gate) * up, down, offsets)
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = expert(e, xs[start : start + n])
            start += n
    return out


def grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # CPU runs it in any float dtype (compiled: through the custom op below); CUDA kernels and
    # torch.compile's tracing there want bf16.
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    return x.dtype == torch.bfloat16 or x.device.type == "cpu"


def _rows_aligned(*ts: torch.Tensor) -> bool:
    """Whether both inner dimensions of these stacked matrices are multiples of 16 bytes, as
    grouped_mm's kernels require of its operands' strides."""
    return all(t.shape[i] * t.element_size() % 16 == 0 for t in ts for i in (-2, -1))


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and (torch.compiler.is_compiling() or _onednn_dtype(x)):
        # Inductor cannot lower F.grouped_mm on CPU; in bf16 the op also keeps the products'
        # shapes few (_grouped_mm_few_shapes)
        return cpu_grouped_mm(x, w, offsets)
    out = F.grouped_mm(x, w, offs=offsets)
    # the backward kernel rejects expanded (stride-0) gradients, e.g. from .sum()
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)
    return out


@torch.library.custom_op("nanoseek::cpu_grouped_mm", mutates_args=())
def cpu_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm as an opaque op that torch.compile calls rather than traces: a
    [M, K] @ b [E, K, N] by row groups -> [M, N], or a [K, M] @ b [M, N] by groups of
    M -> [E, K, N] (the weight gradient). In bf16 or fp16, `_grouped_mm_few_shapes`."""
    if _onednn_dtype(a):
        return _grouped_mm_few_shapes(a, b, offsets)
    return F.grouped_mm(a, b, offs=offsets)


def _onednn_dtype(x: torch.Tensor) -> bool:
    """Whether torch multiplies matrices of x's dtype on CPU with oneDNN (bf16, fp16), which
    builds a kernel for each new shape, rather than with a BLAS's fixed kernels (fp32)."""
    return x.dtype in (torch.bfloat16, torch.float16)


# Row counts, per expert, are multiples of this plus a remainder below it in the bf16 products.
ROW_BLOCK = 32


def _grouped_mm_few_shapes(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`cpu_grouped_mm` in bf16 or fp16: each group's product in two, its rows split into a
    multiple of ROW_BLOCK and the remainder, so that the products' shapes come from a small set.

    oneDNN JIT-compiles a kernel for every new matrix shape and caches it; on a cache miss that
    takes about as long as one expert's product at the reference shapes (0.2-0.4 ms). Routing
    gives every expert a new row count at every step, so F.grouped_mm's one product per group
    missed nearly every time: in the compiled bf16 training step its products took twice their
    time with the counts held fixed. Split, an expert's products take at most M/ROW_BLOCK +
    ROW_BLOCK shapes over a whole run. The same numbers as F.grouped_mm up to rounding: the
    weight gradient adds its two parts in one rounding (oneDNN's sum post-op)."""
    sizes = []  # per group: its block-multiple part's rows, then the remainder's
    start = 0
    for end in offsets.tolist():
        bulk = (end - start) // ROW_BLOCK * ROW_BLOCK
        sizes += [bulk, end - start - bulk]
        start = end
    weights = b.unbind(0) if b.dim() == 3 else None
    if weights is not None:  # a [M, K] @ b[e] by row groups -> [M, N]
        out = a.new_empty(a.shape[0], b.shape[2])
        for i, (rows, out_rows) in enumerate(zip(a.split(sizes), out.split(sizes))):
            if rows.shape[0]:
                torch.mm(rows, weights[i // 2], out=out_rows)
        return out
    # a [K, M] @ b [M, N] by groups of M -> [E, K, N]: the remainder's product, then the rest
    # added to it (the smaller part is the one rounded to the dtype before the sum)
    out = a.new_empty(offsets.shape[0], a.shape[0], b.shape[1])
    a_parts, b_parts = a.split(sizes, dim=1), b.split(sizes)
    for e, grad in enumerate(out.unbind(0)):
        bulk, rest = 2 * e, 2 * e + 1
        if b_parts[rest].shape[0]:
            torch.mm(a_parts[rest], b_parts[rest], out=grad)
            if b_parts[bulk].shape[0]:
                grad.addmm_(a_parts[bulk], b_parts[bulk])
        elif b_parts[bulk].shape[0]:
            torch.mm(a_parts[bulk], b_parts[bulk], out=grad)
        else:  # an expert without rows: a zero gradient, as F.grouped_mm gives
            grad.zero_()
    return out


@cpu_grouped_mm.register_fake
def _(a, b, offsets):
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offsets.shape[0], a.shape[0], b.shape[1])


def _grouped_mm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = cpu_grouped_mm(grad, b.mT, ctx.offsets)
    if b.dim() == 3 and b.mT.is_contiguous():
        # b is a stacked parameter used transposed (Experts: x @ W.mT): its gradient made in W's
        # own layout, so that autograd need not copy a transposed [E, K, N] into it
        grad_b = cpu_grouped_mm(grad.t(), a, ctx.offsets).mT
    else:
        grad_b = cpu_grouped_mm(a.t(), grad, ctx.offsets)
    return grad_a, grad_b, None


def _grouped_mm_setup(ctx, inputs, output):
    a, b, offsets = inputs
    ctx.save_for_backward(a, b)
    ctx.offsets = offsets


cpu_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class Experts(nn.Module):
    """All routed experts as stacked tensors: gate_up_proj [E, 2I, d] (gate rows, then up),
    down_proj [E, d, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        d = cfg.hidden_size
        I = cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, I))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, d], rows sorted by expert, counts [E] rows per expert -> [M, d]."""
        gate_up = self.gate_up_proj.mT
        down = self.down_proj.mT
        if torch.is_autocast_enabled(x.device.type):  # one grouped matmul in the autocast dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            gate_up = gate_up.to(dtype)
            down = down.to(dtype)
        return run_experts(x, counts, self.expert, gate_up, down)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on rows x [n, d]."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        # Always present, as in transformers: with n_shared_experts=0 it
        # is zero-wide and adds nothing.
        shared_width = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared_width)
        self.balance_alpha = cfg.aux_loss_alpha
        # Tokens routed to each expert since the last bias update: the load a trainer logs.
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, d] -> (output [B, T, d], sequence-wise balance loss or None)."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        weights, ids, scores = self.gate(flat)
        routed, counts = dispatch(flat, weights, ids, self.n_experts, self.experts)
        out = routed.view(B, T, d) + self.shared_experts(x)
        balance = None
        if self.training:
            with torch.no_grad():
                self.expert_load += counts.to(self.expert_load.dtype)
            if self.balance_alpha > 0:
                balance = self.sequence_balance_loss(scores.view(B, T, -1), ids.view(B, T, -1))
        return out, balance

    def sequence_balance_loss(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """V3's complementary loss α·Σ_i f_i·P_i per sequence, averaged over the batch."""
        B, T, E = scores.shape
        picked = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, ids.flatten(1), torch.ones(B, T * self.top_k, device=scores.device)
        )
        f = picked * E / (self.top_k * T)  # 1.0 for every expert when the load is even
        p = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)
        return self.balance_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing: nudge each expert's bias by γ toward the
        mean load, then reset the counts.

        `load` overrides the local counts (a data-parallel trainer passes the all-reduced ones).
        """
        load = self.expert_load if load is None else load
        if gamma and load.sum() > 0 and hasattr(self.gate, "e_score_correction_bias"):
            self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load).float()
        self.expert_load.zero_()
