"""The DeepSeek-V3 decoder: pre-norm blocks of MLA + (dense MLP | MoE), a final
norm and head, and the MTP modules.

    x = embed(tokens)
    for each block:  x += MLA(norm(x));  x += FFN(norm(x))        FFN = dense SwiGLU below
    first_k_dense_replace logits = lm_head(norm(x))                                          else
    shared + routed experts MTP module k: h_k = Block_k(eh_proj[enorm(embed(t_{i+k})) ;
    hnorm(h_{k-1})]), predicts t_{i+k+1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import MLA
from nanoseek.model.layers import MLP, RMSNorm
from nanoseek.model.moe import MoE
from nanoseek.model.rope import rope_tables

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens in SFT, padding)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> (x, balance loss or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return self.ffn(x)

    def ffn(self, x: torch.Tensor):
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, balance = self.mlp(h)
            return x + h, balance
        return x + self.mlp(h), None


class MTPModule(nn.Module):
    """One multi-token-prediction depth. Embedding and output head are the main model's."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # on disk: shared_head.norm

    def forward(self, h_prev: torch.Tensor, next_embeds: torch.Tensor, cos, sin):
        """h_prev [B, T, d] (position i) and embed(t_{i+k}) [B, T, d] -> (h
        [B, T, d] before norm, balance)."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(h_prev)), dim=-1))
        return self.block(x, cos, sin)


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate: lm + λ·mtp + balance
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    balance_loss: torch.Tensor | None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """N(0, initializer_range) everywhere; residual-branch outputs scaled
        down by sqrt(2·layers) (GPT-2)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * (self.config.num_hidden_layers + len(self.mtp)))
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norms; biases would be 1-D too, and start at zero
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
                continue
            is_out = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
            p.copy_(torch.randn(p.shape, generator=gen) * (out_std if is_out else std))
        for module in self.modules():
            if isinstance(module, MoE) and hasattr(module.gate, "e_score_correction_bias"):
                module.gate.e_score_correction_bias.zero_()

    @torch.no_grad()
    def rebuild_derived_state(self) -> None:
        """After building on the meta device and `to_empty`: recompute what checkpoints do not hold
        (rope tables, load counters) and re-tie the head, which `to_empty` unties."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(self.config)
        self.rope_cos = cos.to(self.embed_tokens.weight.device)
        self.rope_sin = sin.to(self.embed_tokens.weight.device)
        for moe in self.moe_layers():
            moe.expert_load = torch.zeros_like(moe.expert_load, dtype=torch.float32)

    # ------------------------------------------------------------------ forward
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if int(positions.max()) >= self.rope_cos.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is beyond max_position_embeddings="
                f"{self.rope_cos.shape[0]}"
            )
        return self.rope_cos[positions], self.rope_sin[positions]

    def rope_prefix(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rope tables of positions 0..length-1: `rope(arange(length))` checked on the static
        length, so that a compiled forward has no data-dependent branch."""
        if length > self.rope_cos.shape[0]:
            raise ValueError(
                f"position {length - 1} is beyond max_position_embeddings={self.rope_cos.shape[0]}"
            )
        return self.rope_cos[:length], self.rope_sin[:length]

    def hidden_states(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None):
        """input_ids [B, T] -> (final-normed hidden [B, T, d], summed balance loss or None).
        inputs_embeds [B, T, d], when given, replaces embed(input_ids) (a vision-language model
        passes its image features this way)."""
        cos, sin = self.rope_prefix(input_ids.shape[1])
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        balance = None
        for layer in self.layers:
            x, b = layer(x, cos, sin)
            if b is not None:
                balance = b if balance is None else balance + b
        return self.norm(x), balance

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        mtp_weight: float = 0.3,
        logits_at: torch.Tensor | None = None,
    ):
        """input_ids [B, T] -> logits [B, T, V]; with targets, the LossOutput of `compute_loss` (so
        that DDP and FSDP, which wrap `forward`, see the training computation). logits_at (bool
        [B, T]): only those positions' logits, [N, V] in row-major order (RL scores completions
        only: the output head and the softmax then skip prompts and padding)."""
        if targets is not None:
            return self.compute_loss(input_ids, targets, mtp_weight)
        return self.logits(self.hidden_states(input_ids)[0], logits_at)

    def logits(self, h: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, d] -> logits [B, T, V], or [N, V] at the positions `at`."""
        return self.lm_head(h if at is None else h[at])

    def compute_loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        mtp_weight: float = 0.3,
        inputs_embeds: torch.Tensor | None = None,
    ) -> LossOutput:
        """Next-token cross-entropy, plus λ·MTP loss and the MoE balance loss when they are on.

        targets[b, t] is the token that follows input_ids[b, t]; IGNORE_INDEX marks positions
        without loss. inputs_embeds: as in `hidden_states` (MTP then reads its later tokens' inputs
        from it too).
        """
        h, balance = self.hidden_states(input_ids, inputs_embeds)
        lm_loss = _cross_entropy(self.lm_head(h), targets)
        mtp_loss = None
        if len(self.mtp) and mtp_weight > 0:
            T = input_ids.shape[1]
            losses = []
            for k, module in enumerate(self.mtp, start=1):
                if T - k < 1:
                    break
                cos, sin = self.rope_prefix(T - k)
                # depth k at position i sees h_{k-1}[i] and the token
                # t_{i+k}, and predicts t_{i+k+1}
                later = (
                    self.embed_tokens(input_ids[:, k:])
                    if inputs_embeds is None
                    else inputs_embeds[:, k:]
                )
                h, b = module(h[:, : T - k], later, cos, sin)
                if b is not None:
                    balance = b if balance is None else balance + b
                losses.append(_cross_entropy(self.lm_head(module.norm(h)), targets[:, k:]))
            if losses:
                mtp_loss = torch.stack(losses).mean()
        loss = lm_loss
        if mtp_loss is not None:
            loss = loss + mtp_weight * mtp_loss
        if balance is not None:
            loss = loss + balance
        return LossOutput(loss, lm_loss, mtp_loss, balance)

    # ------------------------------------------------------------------ MoE bookkeeping
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last bias update:
        [n_moe_layers (+ MTP), n_routed_experts]."""
        layers = self.moe_layers()
        return torch.stack([m.expert_load for m in layers]) if layers else torch.zeros(0)

    @torch.no_grad()
    def update_router_biases(self, gamma: float, loads: torch.Tensor | None = None) -> None:
        """After an optimizer step: b_i += γ·sign(mean load − load_i) in every
        MoE layer, then reset the counts."""
        for i, moe in enumerate(self.moe_layers()):
            moe.update_bias(gamma, None if loads is None else loads[i])

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, active: bool = False) -> int:
        """Unique parameters; with active=True, those one token uses (top-k of
        the routed experts), MTP excluded."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if not active:
            return total
        total -= sum(p.numel() for p in self.mtp.parameters())
        cfg = self.config
        for moe in self.moe_layers()[: cfg.n_moe_layers]:
            per_expert = sum(p[0].numel() for p in moe.experts.parameters())
            total -= (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        return total


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
    )
