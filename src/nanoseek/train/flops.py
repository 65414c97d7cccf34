"""FLOPs per token, a measured matmul peak, and MFU: how nanoseek states what its compute costs."""

from __future__ import annotations

import time

import torch

from nanoseek.config import ModelConfig


def active_matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies through (top-k routed + shared experts, attention, head); no
    embedding lookup, no MTP. The 6·N of the 6·N·D rule."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = d * H * cfg.qk_head_dim
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    attn = (
        q
        + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + H * cfg.v_head_dim * d
    )
    dense_mlp = 3 * d * cfg.intermediate_size
    moe_mlp = (
        3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
        + d * cfg.n_routed_experts
    )
    layers = (
        cfg.first_k_dense_replace * dense_mlp
        + cfg.n_moe_layers * moe_mlp
        + cfg.num_hidden_layers * attn
    )
    return layers + d * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of causal attention's two products per trained token (3 × the
    forward's)."""
    # forward per token and layer: QK^T and PV over seq_len/2 keys on average, 2 FLOPs per
    # multiply-add
    forward = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len / 2)
    return 3 * forward * cfg.num_hidden_layers


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6·N_active plus
    causal attention (3 × its forward)."""
    return 6 * active_matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


PEAK_SIZES = (512, 1024, 2048)  # the square matmuls whose best speed is the peak


def measure_matmul_peak(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | tuple[int, ...] = PEAK_SIZES,
    seconds: float = 1.0,
) -> float:
    """FLOP/s of square matmuls on this device and dtype, the best over `size` (one size or
    several, sharing `seconds`): the denominator of MFU. Measure it in the dtype the step's matmuls
    run in (bf16 under bf16 autocast)."""
    sizes = (size,) if isinstance(size, int) else tuple(size)
    return max(_matmul_speed(device, dtype, n, seconds / len(sizes)) for n in sizes)


def _matmul_speed(device, dtype: torch.dtype, size: int, seconds: float) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    _sync(device)
    n = 0
    start = time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        a @ b
        n += 1
    _sync(device)
    return 2 * size**3 * n / (time.perf_counter() - start)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
