"""The model's weights in the layout inference wants: the same math
in fewer, faster kernel launches.

Decoding a few tokens per step is bound by launches and by reading weights, not by arithmetic. So
once per set of weights (and again whenever a parameter changes in place, e.g. after an optimizer
step) the runner gets:
- every matrix stored [in, out] (x @ W_t): CPU GEMMs read it markedly faster than the [out, in] of
  nn.Linear;
- norm weights folded into the next matmul where only a matmul reads the normed vector
  (input_layernorm, q_a_layernorm), so those norms are weightless;
- RoPE folded into the weights: rotating adjacent pairs is y*cos + (P y)*sin with P the fixed pair
  swap (y0, y1) -> (-y1, y0), and P y = (P W) x, so each rope projection also emits its P-rotated
  copy and RoPE is two multiplies and an add;
- stacked projections: [c_q | c_kv | k_rope | P k_rope] from one matmul, [q_nope | q_rope | P
  q_rope] from another, [gate | up] of every SwiGLU from one;
- each routed expert's matrices contiguous, so running one expert is two plain matmuls.
Routing and the expert dispatch are not written here: model/moe.py's are called with these weights.
W_UK and W_UV stay separate (views of kv_b_proj): folding them into the query and output projections
saves two small batched matmuls but makes those weights kv_lora_rank / head_dim times larger.
Quantized modules (quant.py) are kept as they are and called: their int8 kernels do the work;
attention, which needs refolded matrices, uses their dequantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.engine.quant import Int8Experts, Int8Linear
from nanoseek.model import moe
from nanoseek.model.attention import MLA
from nanoseek.model.layers import MLP
from nanoseek.model.transformer import Block, Transformer


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, dim] / rms(x), computed in fp32; the weight, if any, is applied by the
    caller. The mean square (+ eps) is one addmm against a constant column: four launches
    instead of the eight of the textbook form."""
    xf = x if x.dtype == torch.float32 else x.float()
    eps_t, mean_col = _norm_constants(x.shape[-1], eps, x.device)
    out = xf * torch.addmm(eps_t, xf * xf, mean_col).rsqrt_()
    return out if out.dtype == x.dtype else out.to(x.dtype)


_NORM_CONSTANTS: dict = {}


def _norm_constants(
    dim: int, eps: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    key = (dim, eps, device)
    if key not in _NORM_CONSTANTS:
        _NORM_CONSTANTS[key] = (
            torch.full((1, 1), eps, device=device),
            torch.full((dim, 1), 1.0 / dim, device=device),
        )
    return _NORM_CONSTANTS[key]


def rotate_pairs(w: torch.Tensor) -> torch.Tensor:
    """P applied along dim -2 of w [..., rope, in] (dim -1 of a bias [rope]):
    row 2i <- -row 2i+1, 2i+1 <- 2i."""
    if w.dim() == 1:
        return rotate_pairs(w.unsqueeze(-1)).squeeze(-1)
    pairs = w.unflatten(-2, (-1, 2))
    return torch.stack((-pairs[..., 1, :], pairs[..., 0, :]), dim=-2).flatten(-3, -2)


def _w(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def _b(module: nn.Module | None, rows: int) -> torch.Tensor:
    b = None if module is None else getattr(module, "bias", None)
    return torch.zeros(rows) if b is None else b.detach().float()


class Linear:
    """y = x @ w_t (+ b), w_t [in, out]; or a quantized module, called as it is."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        module: Int8Linear | None = None,
    ):
        self.module = module
        if module is None:
            self.w_t = weight.t().contiguous()
            self.b = bias

    @classmethod
    def of(cls, module: nn.Module) -> Linear:
        if isinstance(module, Int8Linear):
            return cls(module=module)
        return cls(_w(module), None if module.bias is None else module.bias.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        return torch.mm(x, self.w_t) if self.b is None else torch.addmm(self.b, x, self.w_t)


class SwiGLU:
    """down(silu(gate x) * up x), gate and up stacked into one matrix (unless quantized)."""

    def __init__(self, mlp: MLP):
        if isinstance(mlp.gate_proj, Int8Linear):
            self.gate_up = None
            self.gate = mlp.gate_proj
            self.up = mlp.up_proj
        else:
            self.gate_up = Linear(torch.cat((_w(mlp.gate_proj), _w(mlp.up_proj))))
        self.down = Linear.of(mlp.down_proj)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Attention:
    """One MLA layer with its input norm. Built in fp32, stored in the model's dtype."""

    def __init__(self, attn: MLA, input_norm: nn.Module):
        H = attn.n_heads
        n = attn.nope_dim
        r = attn.rope_dim
        C = attn.kv_rank
        self.n_heads = H
        self.nope = n
        self.rope = r
        self.kv_rank = C
        self.scale = attn.scale
        self.eps = input_norm.eps
        self.kv_norm_eps = attn.kv_a_layernorm.eps
        dtype = _w(attn.kv_a_proj_with_mqa).dtype
        ln = _w(input_norm).float()

        kv_a, kv_b = _w(attn.kv_a_proj_with_mqa).float(), _b(attn.kv_a_proj_with_mqa, C + r)
        parts, biases = (
            [kv_a[:C], kv_a[C:], rotate_pairs(kv_a[C:])],
            [kv_b[:C], kv_b[C:], rotate_pairs(kv_b[C:])],
        )
        self.q_lora = hasattr(attn, "q_a_proj")
        if self.q_lora:
            Q = attn.q_a_proj.out_features
            parts.insert(0, _w(attn.q_a_proj).float())
            biases.insert(0, _b(attn.q_a_proj, Q))
            self.q_norm_eps = attn.q_a_layernorm.eps
            w_q = _w(attn.q_b_proj).float() * _w(attn.q_a_layernorm).float()
            self.split_in = [Q, C, r, r]
        else:
            w_q = _w(attn.q_proj).float() * ln  # the query reads the normed input directly
            self.split_in = [C, r, r]
        has_bias = attn.kv_a_proj_with_mqa.bias is not None
        self.proj_in = Linear(
            (torch.cat(parts) * ln).to(dtype), torch.cat(biases).to(dtype) if has_bias else None
        )
        self.kv_norm = _w(attn.kv_a_layernorm)

        w_q = w_q.unflatten(0, (H, n + r))  # [H, nope + rope, in]
        q_rope = w_q[:, n:]
        self.proj_q = Linear(
            torch.cat([p.flatten(0, 1) for p in (w_q[:, :n], q_rope, rotate_pairs(q_rope))]).to(
                dtype
            )
        )
        w_uk, w_uv = (w.detach() for w in attn.absorbed_weights())  # [H, nope, C], [H, v, C]
        self.w_uk = w_uk.to(dtype).contiguous()
        self.w_uv_t = w_uv.transpose(1, 2).to(dtype).contiguous()  # [H, C, v]
        self.kv_b = Linear.of(attn.kv_b_proj)
        self.o_proj = Linear.of(attn.o_proj)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [N, d] (the block input, before its norm), cos/sin [N, rope] -> q_nope [N, H, nope],
        q_rope [N, H, rope] (rotated), c_kv [N, C] (normalised), k_rope [N, rope] (rotated)."""
        H = self.n_heads
        n = self.nope
        r = self.rope
        h = rms_normalize(x, self.eps)
        if self.q_lora:
            c_q, c_kv, k, k_rot = self.proj_in(h).split(self.split_in, dim=-1)
            q_in = rms_normalize(c_q, self.q_norm_eps)
        else:
            c_kv, k, k_rot = self.proj_in(h).split(self.split_in, dim=-1)
            q_in = h
        c_kv = rms_normalize(c_kv, self.kv_norm_eps) * self.kv_norm
        q_nope, q, q_rot = (
            t.unflatten(-1, (H, -1)) for t in self.proj_q(q_in).split([H * n, H * r, H * r], -1)
        )
        cos_h, sin_h = cos.unsqueeze(1), sin.unsqueeze(1)
        # cos/sin may be fp32 in a bf16 model (load_model keeps the RoPE tables fp32): rotate in
        # their precision, as the model does, and hand on the weights' dtype
        q_rope = (q * cos_h + q_rot * sin_h).to(q.dtype)
        k_rope = (k * cos + k_rot * sin).to(k.dtype)
        return q_nope, q_rope, c_kv, k_rope

    def expand(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [S, C], [S, rope] -> per-head keys [1, H, S, nope +
        rope] and values [1, H, S, v]."""
        kv = self.kv_b(c_kv).unflatten(-1, (self.n_heads, -1)).transpose(0, 1)  # [H, S, nope + v]
        k_nope, v = kv.split([self.nope, kv.shape[-1] - self.nope], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(self.n_heads, -1, -1)), dim=-1)
        return k.unsqueeze(0), v.unsqueeze(0)


class Router:
    """The model's router with its weight stored [in, out]; the decision itself is moe.Router's."""

    def __init__(self, gate: moe.Router):
        self.gate = gate
        self.w_t = _w(gate).float().t().contiguous()
        self.bias = gate.e_score_correction_bias.detach().clone() if gate.sigmoid else None
        self.bias_list = self.bias.tolist() if gate.sigmoid else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x if x.dtype == torch.float32 else x.float(), self.w_t)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> weights [N, K] (fp32), expert ids [N, K]."""
        weights, ids, _ = self.gate.route(self.logits(x), self.bias)
        return weights, ids

    def route_one(self, x: torch.Tensor) -> tuple[list[int], list[float]]:
        """The same decision for a single token x [1, d], made in Python (moe.Router.route_one)."""
        return self.gate.route_one(self.logits(x), self.bias_list)


class MoEWeights:
    """Router, routed experts (stacked gate_up [E, d, 2I] and down [E, I, d], so
    each expert's matrices are contiguous) and shared experts. The dispatch is the
    model's (moe.dispatch, moe.run_experts)."""

    def __init__(self, moe_layer: moe.MoE):
        self.router = Router(moe_layer.gate)
        self.shared = SwiGLU(moe_layer.shared_experts)
        self.n_experts = moe_layer.n_experts
        if isinstance(moe_layer.experts, Int8Experts):
            self.quantized = moe_layer.experts
            self.gate_up_t = None
            self.down_t = None
        else:
            self.quantized = None
            self.gate_up_t = moe_layer.experts.gate_up_proj.detach().transpose(1, 2).contiguous()
            self.down_t = moe_layer.experts.down_proj.detach().transpose(1, 2).contiguous()
            # per-expert views
            self.each = list(zip(self.gate_up_t.unbind(0), self.down_t.unbind(0)))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.expert_forward(e, x)
        gate_up, down = self.each[e]
        gate, up = torch.mm(x, gate_up).chunk(2, dim=-1)
        return torch.mm(F.silu(gate) * up, down)

    def run(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert through their experts: one grouped matmul
        per stacked matrix when it can."""
        return moe.run_experts(xs, counts, self.expert, self.gate_up_t, self.down_t)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> shared experts + the weighted routed experts of each token."""
        out = self.shared(x)
        if x.shape[0] == 1:  # one token: routed in Python, no sorting, just its K experts
            ids, weights = self.router.route_one(x)
            return moe.dispatch_one(x, ids, weights, self.expert, out)
        weights, ids = self.router(x)
        routed, _ = moe.dispatch(x, weights, ids, self.n_experts, self.run)
        return out + routed


class BlockWeights:
    def __init__(self, block: Block):
        self.attn = Attention(block.self_attn, block.input_layernorm)
        norm = block.post_attention_layernorm
        self.ffn_norm = _w(norm)
        self.ffn_eps = norm.eps
        self.ffn = MoEWeights(block.mlp) if block.is_moe else SwiGLU(block.mlp)


class InferenceWeights:
    """Every block (the main ones, then the MTP block if asked) and the head, rebuilt by current()
    when a parameter they come from has changed in place (torch bumps a tensor's version on every
    in-place write); the engine calls it before it admits requests. A parameter replaced by a new
    object is not seen: call refresh() after load_state_dict(assign=True). `generation` counts the
    rebuilds (a compiled graph over these weights is stale once it moves)."""

    def __init__(self, model: Transformer, with_mtp: bool):
        self.model = model
        self.with_mtp = with_mtp
        self.generation = 0
        self.refresh()

    def refresh(self) -> None:
        model = self.model
        blocks = list(model.layers) + ([model.mtp[0].block] if self.with_mtp else [])
        with torch.no_grad():
            self.blocks = [BlockWeights(b) for b in blocks]
            self.lm_head = Linear.of(model.lm_head)
            self.eh_proj = Linear.of(model.mtp[0].eh_proj) if self.with_mtp else None
        self.generation += 1
        self._versions = [
            (t, t._version)
            for t in (*model.parameters(), *model.buffers())
            if t.is_floating_point()
        ]

    def current(self) -> InferenceWeights:
        if any(t._version != v for t, v in self._versions):
            self.refresh()
        return self
