"""DeepSeekMoE: shared experts plus fine-grained routed experts, dropless.

Routing (V3): sigmoid affinities; a per-expert bias, trained by the balancing rule rather than by gradients, shifts
which experts are *selected* but never the weights; experts come in groups and a token may use only the top
`topk_group` groups (a group scores the sum of its two best experts). V2 routing (softmax, group max) is kept for
DeepSeek-V2 checkpoints.

Dispatch: the (token, expert) pairs are sorted by expert so each expert's tokens form one contiguous slice, all
experts run as one grouped matmul, and the weighted outputs are scatter-added back. No capacity, nothing dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import MLP


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.sigmoid = cfg.scoring_func == "sigmoid"
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.sigmoid:  # V3's balancing bias: fp32, selection only, updated outside autograd
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # The bias stays fp32 whatever dtype the model is cast to (bf16 would round away updates of size γ).
        bias = getattr(self, "e_score_correction_bias", None)
        super()._apply(fn, recurse)
        if bias is not None:
            device = self.weight.device
            self.e_score_correction_bias = torch.empty(bias.shape, dtype=torch.float32, device=device) \
                if bias.is_meta or device.type == "meta" else bias.to(device=device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> weights [N, K], expert ids [N, K], affinities [N, E] (fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions are made in fp32
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.sigmoid else scores
        choice = choice.detach()
        if self.n_group > 1:
            grouped = choice.unflatten(-1, (self.n_group, -1))
            group_score = grouped.topk(2, dim=-1).values.sum(-1) if self.sigmoid else grouped.amax(-1)
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)  # the unbiased affinities
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids, scores


class Experts(nn.Module):
    """All routed experts as stacked tensors: gate_up_proj [E, 2I, d] (gate rows, then up), down_proj [E, d, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, I))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, d], rows sorted by expert, counts [E] rows per expert -> [M, d]."""
        if grouped_mm_ok(x, self.gate_up_proj):
            offsets = counts.cumsum(0).to(torch.int32)
            h = _grouped_mm(x, self.gate_up_proj.mT, offsets)
            gate, up = h.chunk(2, dim=-1)
            return _grouped_mm(F.silu(gate) * up, self.down_proj.mT, offsets)
        # Fallback: one matmul per non-empty expert, on its contiguous slice.
        out, start = torch.empty_like(x), 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = F.linear(x[start : start + n], self.gate_up_proj[e]).chunk(2, dim=-1)
                out[start : start + n] = F.linear(F.silu(gate) * up, self.down_proj[e])
                start += n
        return out


def grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # Eager CPU runs it in any float dtype; CUDA kernels and torch.compile's tracing want bf16.
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    return x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = F.grouped_mm(x, w, offs=offsets)
    if out.requires_grad:  # the backward kernel rejects expanded (stride-0) gradients, e.g. from .sum()
        out.register_hook(torch.Tensor.contiguous)
    return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        # Always present, as in transformers: with n_shared_experts=0 it is zero-wide and adds nothing.
        self.shared_experts = MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
        self.balance_alpha = cfg.aux_loss_alpha
        # Tokens routed to each expert since the last bias update: the load statistics a trainer logs.
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, d] -> (output [B, T, d], sequence-wise balance loss or None)."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        weights, ids, scores = self.gate(flat)
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts)
        order = ids.flatten().argsort(stable=True)
        token = order // self.top_k
        # index_select rather than flat[token]: its backward is a fast index_add, not an accumulating index_put
        y = self.experts(flat.index_select(0, token), counts) * weights.flatten()[order].unsqueeze(-1).type_as(flat)
        out = torch.zeros_like(flat).index_add_(0, token, y).view(B, T, d) + self.shared_experts(x)
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
            1, ids.flatten(1), torch.ones(B, T * self.top_k, device=scores.device))
        f = picked * E / (self.top_k * T)  # 1.0 for every expert when the load is perfectly even
        p = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)
        return self.balance_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing: nudge each expert's bias by γ toward the mean load, then reset the counts.

        `load` overrides the local counts (a data-parallel trainer passes the all-reduced ones).
        """
        load = self.expert_load if load is None else load
        if gamma and load.sum() > 0 and hasattr(self.gate, "e_score_correction_bias"):
            self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load).float()
        self.expert_load.zero_()
