"""int8 weight-only quantization: 4x smaller matrices, activations stay in floating point.

Scheme: symmetric, one scale per output channel. For a matrix W [out, in]:  s = max|W[o, :]| / 127,
q = round(W / s) clamped to [-127, 127], and W ~ q * s. Quantized: every nn.Linear of the blocks,
the MTP module and the head (not a head tied to the embedding), and the stacked routed experts (one
scale per expert and output row). Kept in floating point: embeddings, norms, the router (its choices
are discrete) and its bias.

A quantized model is an ordinary Transformer whose Linear modules are Int8Linear and whose experts
are Int8Experts, so `model(ids)` and the engine both run it. Matrices are stored [in, out] (the
layout CPU GEMMs read fastest); a matmul converts them to the activation dtype and scales the output
columns.

On disk: `model.int8.safetensors` beside the floating-point checkpoint, which stays untouched
(transformers still loads the directory and ignores the extra file). For each quantized module NAME
(our module path, e.g. `layers.3.mlp.experts`): NAME.qweight (int8, [out, in] as nn.Linear stores
it; [E, out, in] for experts), NAME.scale (fp32, [out] or [E, out]), and NAME.bias when the Linear
has one. The header metadata says {"format": "nanoseek-int8", "scheme": "symmetric
per-output-channel weight-only"}.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nanoseek.io import atomic_file
from nanoseek.model.moe import run_experts

INT8_FILE = "model.int8.safetensors"
_METADATA = {"format": "nanoseek-int8", "scheme": "symmetric per-output-channel weight-only"}


def quantize_tensor(
    w: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 [..., out, in], scale [..., out] in scale_dtype)
    with w ~ q * scale[..., None]. The scales are rounded to scale_dtype before q is computed, so
    that q * scale is as close to w as int8 allows with scales of that dtype."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=-1).clamp_min(1e-12) / 127.0).to(scale_dtype)
    q = torch.round(w / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.dtype = dtype
        self.register_buffer("q_t", q.t().contiguous())  # [in, out]
        self.register_buffer("scale", scale.float())
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_tensor(linear.weight)
        return cls(q, scale, linear.bias, linear.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix [out, in], for code that reads
        weights (e.g. refolding attention)."""
        return (self.q_t.t().float() * self.scale.unsqueeze(-1)).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.q_t.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Experts(nn.Module):
    """Stacked routed experts in int8, with the contract of model.moe.Experts:
    forward(x sorted by expert, counts)."""

    def __init__(
        self,
        gate_up: tuple[torch.Tensor, torch.Tensor],
        down: tuple[torch.Tensor, torch.Tensor],
        dtype: torch.dtype,
    ):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("gate_up_t", gate_up[0].transpose(1, 2).contiguous())  # [E, d, 2I]
        self.register_buffer("gate_up_scale", gate_up[1].float())  # [E, 2I]
        self.register_buffer("down_t", down[0].transpose(1, 2).contiguous())  # [E, I, d]
        self.register_buffer("down_scale", down[1].float())  # [E, d]

    @classmethod
    def from_experts(cls, experts: nn.Module) -> Int8Experts:
        return cls(
            quantize_tensor(experts.gate_up_proj),
            quantize_tensor(experts.down_proj),
            experts.gate_up_proj.dtype,
        )

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = (x @ self.gate_up_t[e].to(x.dtype)) * self.gate_up_scale[e].to(x.dtype)
        gate, up = h.chunk(2, dim=-1)
        return ((F.silu(gate) * up) @ self.down_t[e].to(x.dtype)) * self.down_scale[e].to(x.dtype)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return run_experts(x, counts, self.expert_forward)


# ---------------------------------------------------------------------- whole models
def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of everything to quantize, in a fixed order."""
    from nanoseek.model.moe import Experts

    tied = model.config.tie_word_embeddings
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, Int8Linear)) and not (name == "lm_head" and tied):
            out.append((name, m))
        elif isinstance(m, (Experts, Int8Experts)):
            out.append((name, m))
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """-> the model with int8 Linear layers and experts (a copy unless inplace)."""
    model = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for name, m in _targets(model):
            if isinstance(m, nn.Linear):
                _set(model, name, Int8Linear.from_linear(m))
            elif not isinstance(m, Int8Experts):
                _set(model, name, Int8Experts.from_experts(m))
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Experts)) for m in model.modules())


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the int8 tensors of a quantized model to path/model.int8.safetensors (the
    floating-point checkpoint beside it is left alone; save it first with nanoseek.save_model)."""
    tensors = {}
    for name, m in _targets(model):
        if isinstance(m, Int8Linear):
            tensors[f"{name}.qweight"] = m.q_t.t().contiguous()
            tensors[f"{name}.scale"] = m.scale
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().contiguous()
        elif isinstance(m, Int8Experts):
            tensors[f"{name}.gate_up.qweight"] = m.gate_up_t.transpose(1, 2).contiguous()
            tensors[f"{name}.gate_up.scale"] = m.gate_up_scale
            tensors[f"{name}.down.qweight"] = m.down_t.transpose(1, 2).contiguous()
            tensors[f"{name}.down.scale"] = m.down_scale
        else:
            raise ValueError(f"{name} is not quantized: call quantize_model first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / INT8_FILE) as tmp:
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp), metadata=_METADATA)
    return path / INT8_FILE


def load_quantized(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a checkpoint directory holding model.int8.safetensors: the floating-point model for
    everything that stays in floating point, with the int8 modules read from the file."""
    from nanoseek.checkpoint import load_model

    path = Path(path)
    file = path / INT8_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"no {INT8_FILE} in {path}: quantize with nanoseek.engine.quant.quantize_model "
            "and save with save_quantized"
        )
    model = load_model(path, device=device, dtype=dtype)
    dtype = model.embed_tokens.weight.dtype
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        if (f.metadata() or {}).get("format") != _METADATA["format"]:
            raise ValueError(f"{file} is not a nanoseek int8 file (metadata {f.metadata()})")
        keys = set(f.keys())
        for name, m in _targets(model):
            if isinstance(m, nn.Linear):
                _need(keys, file, f"{name}.qweight", f"{name}.scale")
                q = f.get_tensor(f"{name}.qweight")
                if tuple(q.shape) != tuple(m.weight.shape):
                    raise ValueError(
                        f"{file}: {name}.qweight has shape {list(q.shape)}, "
                        f"the model {list(m.weight.shape)}"
                    )
                bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in keys else None
                _set(model, name, Int8Linear(q, f.get_tensor(f"{name}.scale"), bias, dtype))
            else:
                _need(
                    keys,
                    file,
                    *(f"{name}.{p}.{s}" for p in ("gate_up", "down") for s in ("qweight", "scale")),
                )
                gate_up = (
                    f.get_tensor(f"{name}.gate_up.qweight"),
                    f.get_tensor(f"{name}.gate_up.scale"),
                )
                down = (f.get_tensor(f"{name}.down.qweight"), f.get_tensor(f"{name}.down.scale"))
                if tuple(gate_up[0].shape) != tuple(m.gate_up_proj.shape):
                    raise ValueError(
                        f"{file}: {name}.gate_up.qweight has shape {list(gate_up[0].shape)}, "
                        f"the model {list(m.gate_up_proj.shape)}"
                    )
                _set(model, name, Int8Experts(gate_up, down, dtype))
    return model.eval()


def _need(keys: set[str], file: Path, *names: str) -> None:
    missing = [n for n in names if n not in keys]
    if missing:
        raise ValueError(f"{file} lacks {missing}: it was written for another model")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (int8 matrices count one byte per weight)."""
    seen = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# ---------------------------------------------------------------------- quality
@torch.no_grad()
def quantization_error(reference: nn.Module, quantized: nn.Module, token_ids: torch.Tensor) -> dict:
    """What int8 costs on held-out tokens [B, T]: the largest logit difference and the perplexity of
    the next token under both models (and its relative change)."""
    ref_logits, q_logits = reference(token_ids).float(), quantized(token_ids).float()
    targets = token_ids[:, 1:].flatten()

    def perplexity(logits: torch.Tensor) -> float:
        return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets).item())

    ppl_ref, ppl_q = perplexity(ref_logits), perplexity(q_logits)
    return {
        "max_logit_error": (ref_logits - q_logits).abs().max().item(),
        "mean_logit_error": (ref_logits - q_logits).abs().mean().item(),
        "logit_scale": ref_logits.abs().mean().item(),
        "perplexity_fp": ppl_ref,
        "perplexity_int8": ppl_q,
        "perplexity_change": ppl_q / ppl_ref - 1,
        "weight_bytes_fp": weight_bytes(reference),
        "weight_bytes_int8": weight_bytes(quantized),
        "tokens": int(targets.numel()),
    }
