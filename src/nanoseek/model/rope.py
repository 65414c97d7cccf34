"""Rotary position embedding, adjacent-pair convention, with YaRN context extension.

DeepSeek rotates the rope dims as adjacent pairs (x0, x1), (x2, x3), ...; pair i turns at frequency
ω_i. We keep that layout: checkpoints load without any permutation, and q·k equals transformers'
(which regroups evens and odds).
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """ω_i for the rope dims, and the magnitude factor that multiplies cos/sin
    (1.0 unless YaRN says otherwise)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0

    factor = float(rs["factor"])
    original_len = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    # cos/sin magnitude; with DeepSeek's mscale == mscale_all_dim it is 1 and the correction goes
    # into the softmax scale instead (ModelConfig.softmax_scale).
    if mscale and mscale_all_dim:
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    # Dims that turn more than beta_fast times over the original context keep their
    # frequency, dims that turn less than beta_slow times are interpolated by 1/factor, and
    # a linear ramp blends the ones in between.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, attention_factor


def rope_tables(cfg: ModelConfig, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, each [length, rope_dim/2], in fp32."""
    length = length or cfg.max_position_embeddings
    inv_freq, magnitude = inverse_frequencies(cfg)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos() * magnitude, angles.sin() * magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [..., T, (heads,) rope_dim] by cos/sin
    broadcastable to [..., T, (1,) rope_dim/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
