"""Optimizers and learning-rate schedules.

AdamW for everything by default. Muon (momentum + Newton–Schulz orthogonalisation) is an option for
the hidden matrices, stacked expert tensors included (one orthogonalisation per expert); embeddings,
the head, norms and the router stay on AdamW, as in the Muon and Moonlight recipes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_multiplier(
    step: int,
    *,
    warmup: int,
    total: int,
    schedule: str = "cosine",
    min_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier of the peak learning rate at `step` (0-based).

    cosine: linear warm-up, then cosine down to min_ratio at `total`.
    wsd:    warm-up, stable at the peak, then linear decay to min_ratio over the last
    `decay_fraction` of steps.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = total - int(decay_fraction * total)
        if step < decay_start:
            return 1.0
        return 1.0 - (1 - min_ratio) * min(1.0, (step - decay_start) / max(1, total - decay_start))
    raise ValueError(f"schedule={schedule!r}: must be 'cosine' or 'wsd'")


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of g (quintic iteration,
    coefficients of Keller Jordan's Muon)."""
    a = 3.4445
    b = -4.7750
    c = 2.0315
    x = g.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if transposed else x).type_as(g)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised, scaled so
    its RMS matches AdamW's (≈ 0.2·lr)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = _newton_schulz(p.grad.add(buf, alpha=group["momentum"]))
                rows, cols = p.shape[-2:]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(rows, cols)))


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepping together, seen as one (one
    state_dict, one set of param_groups)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]
        self.defaults = {}
        self.state = {}

    def step(self, closure=None):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def build_optimizer(
    model: nn.Module,
    *,
    name: str = "adamw",
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    muon_lr: float = 0.02,
    router_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW (decay on matrices only) or Muon for hidden matrices + AdamW for the rest. Each param
    group keeps its peak rate in `initial_lr` so a schedule can scale it. The routers are a group of
    their own (AdamW, no weight decay, router_lr_scale × lr), so their rate can be tuned against the
    balancing bias's speed γ."""
    matrices = []
    embeddings = []
    routers = []
    others = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "embed_tokens" in pname or "lm_head" in pname:
            embeddings.append(p)
        elif pname.endswith("mlp.gate.weight"):
            routers.append(p)
        elif p.dim() >= 2:
            matrices.append(p)
        else:
            others.append(p)
    fused = adamw_kernel(list(model.parameters()))
    router_group = dict(params=routers, weight_decay=0.0, lr=lr * router_lr_scale)
    if name == "adamw":
        groups = [
            dict(params=matrices + embeddings, weight_decay=weight_decay),
            router_group,
            dict(params=others, weight_decay=0.0),
        ]
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)
    elif name == "muon":
        adam = torch.optim.AdamW(
            [
                dict(params=embeddings, weight_decay=weight_decay),
                router_group,
                dict(params=others, weight_decay=0.0),
            ],
            lr=lr,
            betas=betas,
            **fused,
        )
        opt = CombinedOptimizer([Muon(matrices, lr=muon_lr, weight_decay=weight_decay), adam])
    else:
        raise ValueError(f"optimizer={name!r}: must be 'adamw' or 'muon'")
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def adamw_kernel(params: list[torch.Tensor]) -> dict:
    """AdamW's fused kernel (one pass over each tensor; several times faster than the foreach
    kernels on CPU, docs/training.md) wherever it runs: plain float tensors on CPU or CUDA.
    Sharded (DTensor) parameters keep the foreach kernels."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed
        DTensor = ()  # noqa: N806
    plain = all(
        not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point()
        for p in params
    )
    return {"fused": True} if plain else {"foreach": True}
