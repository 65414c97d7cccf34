"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values come from one compressed latent c_kv (kv_lora_rank wide, RMS-normalised) plus one
rope key shared by all heads. Two ways to use the same weights:
- expanded (training, prefill): up-project the latent to per-head K/V and run causal SDPA;
- absorbed (decode): fold kv_b_proj into the query and the output, and attend over the latent
  itself, so a cache holds only kv_lora_rank + qk_rope_head_dim values per token per layer.

The absorbed math is written once, here, as three functions on token rows (absorb_query,
attend_latent, expand_output), and the engine calls them: engine/weights.py keeps W_UK and W_UV^T
(from `absorbed_weights`) in its own layout and engine/runner.py runs them over the paged cache. A
model without a cache never needs them (its forward is the expanded path), so MLA has no absorbed
forward of its own; tests/test_model.py composes the three functions over MLA's weights and pins
them to the expanded path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import RMSNorm
from nanoseek.model.rope import apply_rope


def values_for_sdpa(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """v zero-padded to q's head width on CPU, where SDPA's fused (flash) kernel wants values as
    wide as queries and runs unfused otherwise (training at the reference shapes: 1.4x slower
    forward + backward; the engine's prefill at one thread: 256 tokens 1.2x, 1,000 tokens 2.3x
    slower). The output's extra columns are zeros, to be cut off."""
    if v.device.type == "cpu" and v.shape[-1] < q.shape[-1]:
        return F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    return v


def causal_attention_products(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention as its two products, in the inputs' dtype (bf16 under autocast), with the
    scores masked and soft-maxed in fp32 between them: q, k [B, H, T, D], v [B, H, T, Dv] ->
    [B, H, T, Dv]. The same function as causal SDPA, unfused: compiled, Inductor fuses the mask
    and softmax, and at short rows on a CPU this can beat the fused kernel (MLA.kernel)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


class MLA(nn.Module):
    # How the training path's causal attention runs: None (or "bf16") the fused SDPA kernel in
    # the inputs' dtype; "fp32" that kernel with its inputs cast up and its output cast back;
    # "math" `causal_attention_products`. Under bf16 autocast on a CPU either of the last two can
    # be the faster (train/precision.py, attention_kernel, times them).
    kernel: str | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        d = cfg.hidden_size
        H = cfg.num_attention_heads
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(H * cfg.v_head_dim, d, bias=bias)

    # ------------------------------------------------------------- projections shared by both paths
    def query(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> q_nope [B, T, H, nope], q_rope [B, T, H, rope] (rotated)."""
        q = (
            self.q_proj(x)
            if hasattr(self, "q_proj")
            else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        )
        q = q.unflatten(-1, (self.n_heads, -1))
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2))

    def latent(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> what a cache stores: c_kv [B, T, kv_rank]
        (normalised), k_rope [B, T, rope] (rotated)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin)

    # ---------------------------------------------------------------- expanded path
    def expand(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent -> per-head keys [B, H, S, nope+rope] and values [B, H, S, v]."""
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = k_rope.unsqueeze(1).expand(-1, self.n_heads, -1, -1)
        return torch.cat((k_nope, k_rope), dim=-1), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, T, d] with no cache
        (training, full-sequence scoring)."""
        q_nope, q_rope = self.query(x, cos, sin)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
        k, v = self.expand(*self.latent(x, cos, sin))
        v_dim = v.shape[-1]
        o = self.attend(q, k, v)
        # transposed before any padding is cut off: the output's gradient then arrives in the
        # fused kernel's own [B, T, H, D] layout, which its backward would otherwise copy into
        return self.o_proj(o.transpose(1, 2)[..., :v_dim].flatten(2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention by `kernel` -> [B, H, T, v or more]: the fused kernel's output keeps
        the columns its values were padded with (values_for_sdpa), to be cut off."""
        if self.kernel == "math":
            return causal_attention_products(q, k, v, self.scale)
        v = values_for_sdpa(v, q)
        if self.kernel != "fp32" or q.dtype == torch.float32:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        with torch.autocast(q.device.type, enabled=False):
            o = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), is_causal=True, scale=self.scale
            )
        return o.to(q.dtype)

    # ---------------------------------------------------------------- absorbed path
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj viewed per head: W_UK [H, nope, kv_rank] and W_UV [H, v, kv_rank]."""
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))
        return w[:, : self.nope_dim], w[:, self.nope_dim :]


# ------------------------------------------------------------ the absorbed math (decode)
def absorb_query(q_nope: torch.Tensor, q_rope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [N, H, nope], q_rope [N, H, rope], W_UK [H, nope, kv_rank] -> [N, H, kv_rank + rope]:
    the query in latent space (W_UK^T q_nope), to score against cached [c_kv | k_rope] rows."""
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
    return torch.cat((q_latent, q_rope), dim=-1)


def attend_latent(
    q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, scale: float, kv_rank: int
) -> torch.Tensor:
    """Absorbed queries q [B, M, kv_rank + rope] (M: every query's heads in a row) over latent rows
    kv [B, S, kv_rank + rope], bias [B, M, S] (0 = may attend, -inf = may not)
    -> attention-weighted latents [B, M, kv_rank]. Scores in fp32; the value read is c_kv itself."""
    q32 = q if q.dtype == torch.float32 else q.float()
    kv32 = kv if kv.dtype == torch.float32 else kv.float()
    scores = torch.baddbmm(bias, q32, kv32.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1).to(kv.dtype), kv[..., :kv_rank])


def expand_output(o_latent: torch.Tensor, w_uv_t: torch.Tensor) -> torch.Tensor:
    """Attention-weighted latents [N, H, kv_rank], W_UV^T [H, kv_rank, v] -> per-head values
    [N, H*v], ready for o_proj."""
    return torch.bmm(o_latent.transpose(0, 1), w_uv_t).transpose(0, 1).flatten(1)
