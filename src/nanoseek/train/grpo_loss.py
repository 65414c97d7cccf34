"""The math of GRPO: group-normalised advantages and the clipped
policy-gradient loss, with the known fixes.

For a prompt q the policy samples a group of G completions o_1..o_G with rewards r_1..r_G. Every
token of o_i gets the same advantage

    A_i = (r_i - mean(r)) / (std(r) + eps)        scale="group"  (DeepSeekMath, R1)
    A_i = (r_i - mean(r)) / (std(r_batch) + eps)  scale="batch"  (mean per group, std over the
                                                                  whole batch)
    A_i =  r_i - mean(r)                          scale="none"   (Dr. GRPO: the std division
                                                                  favours questions that are too
                                                                  easy or too hard)

and the loss of token t of o_i, with ρ = π_θ / π_old (π_old: the policy that sampled the batch), is

    ℓ_it = -min(ρ·A_i, clip(ρ, 1 - ε_low, 1 + ε_high)·A_i) + β·KL_it
    KL_it = π_ref/π_θ - log(π_ref/π_θ) - 1        (the k3 estimator: unbiased, never negative)

ε_high > ε_low is DAPO's clip-higher (rare tokens may grow, entropy does not collapse). The token
losses become one number in one of three ways:

    aggregation="token"     Σ ℓ / (completion tokens in the batch)      DAPO: every token weighs
                                                                        the same
    aggregation="sequence"  mean over sequences of (Σ_t ℓ_it / |o_i|)  GRPO as published:
                                                                        length-biased
    aggregation="constant"  Σ ℓ / (sequences · max completion tokens)  Dr. GRPO: no length
                                                                        normalisation

The functions work on one micro-batch at a time; the `num_*` arguments give the totals of the whole
batch so that micro-batch losses add up to the batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.model import IGNORE_INDEX

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token", "sequence", "constant")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """rewards [num_groups * G], each group contiguous -> advantages of the
    same shape (std: unbiased, as TRL)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: must be one of {SCALES}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size} (need G >= 2)"
        )
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std() + eps)
    return centred.flatten()


def zero_variance_groups(rewards: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """[num_groups] bool: groups whose rewards are all equal. Their
    advantages are zero: no learning signal."""
    r = rewards.float().view(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) <= tol


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V], targets [...] (IGNORE_INDEX where no token is scored) -> (log π(target)
    [...] with gradient, entropy of π [...] without); both 0 at ignored positions. π is
    softmax(logits / temperature): the policy that sampled the completions, so a rollout at
    temperature T stays on-policy."""
    logits = logits.float()
    logp_all = F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    mask = targets != IGNORE_INDEX
    logp = logp_all.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logp, entropy


def scored_logprobs(
    model, input_ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs of model(input_ids, **kwargs), [B, T] each, with the output head and the
    softmax computed at the scored positions only (`logits_at`): a GRPO row is mostly prompt and
    padding, and over a 4 K vocabulary the head and softmax are a large share of the step."""
    mask = targets != IGNORE_INDEX
    logits = model(input_ids, logits_at=mask, **kwargs)
    logp, entropy = token_logprobs(logits, targets[mask], temperature)
    return (
        logp.new_zeros(mask.shape).masked_scatter(mask, logp),
        entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
    )


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) estimate from samples of π_θ: e^(ref - θ) - (ref - θ) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # this micro-batch's share of the batch loss (what to backpropagate)
    per_token: torch.Tensor  # [B, T] the token losses ℓ (0 where masked)
    ratio: torch.Tensor  # [B, T] ρ, detached
    # [B, T] bool: A < 0 and ρ < 1 - ε_low (the clip removes the gradient)
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor  # [B, T] bool: A > 0 and ρ > 1 + ε_high
    kl: torch.Tensor | None  # [B, T] k3 estimate, detached; None without a reference


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    aggregation: str = "token",
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    max_completion_tokens: int | None = None,
) -> PolicyLoss:
    """The clipped GRPO objective (negated, to minimise) for a micro-batch.

    logp, old_logp, ref_logp, mask: [B, T] over the scored (completion) tokens; advantages: [B].
    num_sequences / num_tokens: the whole batch's sequences and scored tokens (default: this
    micro-batch's); max_completion_tokens: the constant of aggregation="constant".
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: must be one of {AGGREGATIONS}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp)")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = per_token * mask

    n_seq = num_sequences if num_sequences is not None else logp.shape[0]
    if aggregation == "token":
        n_tok = num_tokens if num_tokens is not None else mask.sum()
        loss = per_token.sum() / max(float(n_tok), 1.0)
    elif aggregation == "sequence":
        loss = (per_token.sum(1) / mask.sum(1).clamp_min(1)).sum() / n_seq
    else:
        if max_completion_tokens is None:
            raise ValueError('aggregation="constant" needs max_completion_tokens')
        loss = per_token.sum() / (n_seq * max_completion_tokens)

    r = ratio.detach()
    on = mask.bool()
    return PolicyLoss(
        loss=loss,
        per_token=per_token,
        ratio=r,
        clipped_low=on & (adv < 0) & (r < 1 - eps_low),
        clipped_high=on & (adv > 0) & (r > 1 + eps_high),
        kl=None if kl is None else (kl * mask).detach(),
    )
