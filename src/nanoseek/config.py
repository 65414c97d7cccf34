"""ModelConfig: the architecture, with the field names of Hugging Face's `DeepseekV3Config`.

One dataclass describes every model nanoseek builds, from a 1 M-parameter CPU toy to DeepSeek-V3
itself. It reads the config.json of transformers 4.x (`rope_theta` + `rope_scaling`), 5.x
(`rope_parameters`) and the official DeepSeek releases, and writes one that both transformers
generations load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.io import atomic_write_text

# Keys whose value another name carries in some config.json
# (V2 / transformers aliases -> our field name).
_ALIASES = {
    "num_local_experts": "n_routed_experts",
    "num_experts": "n_routed_experts",
    "num_mtp_layers": "num_nextn_predict_layers",
}
_YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


class ConfigError(ValueError):
    """A config that cannot describe a working model; the message names the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768  # width of the dense SwiGLU layers
    moe_intermediate_size: int = 128  # width of each routed expert
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # vestigial in MLA: always equal to the head count
    # --- MoE
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"  # "sigmoid" (V3, bias-corrected selection) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # written for other runtimes; the router follows scoring_func
    first_k_dense_replace: int = 1  # layers below this index use a dense MLP
    # α of the complementary sequence-wise balance loss (0 turns it off)
    aux_loss_alpha: float = 1e-4
    # --- MLA
    kv_lora_rank: int = 64
    q_lora_rank: int | None = 128  # None: a plain q_proj (V2-Lite style)
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    attention_bias: bool = False
    # --- positions
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_scaling: dict[str, Any] | None = None
    # --- the rest
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0  # MTP modules
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"  # dtype of the tensors on disk
    # keys this dataclass does not know, kept for the round trip
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        # An MTP block (index >= num_hidden_layers) is of the kind of
        # the last main layer: MoE in V3.
        return min(layer_idx, self.num_hidden_layers - 1) >= self.first_k_dense_replace

    @property
    def yarn_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale² temperature correction when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim") or 0.0
            if mscale_all_dim and self.yarn_factor > 1:
                m = 0.1 * mscale_all_dim * math.log(self.yarn_factor) + 1.0
                scale *= m * m
        return scale

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes the latent KV cache holds per token: (kv_lora_rank + rope
        dim) per layer, nothing more."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers * dtype_bytes

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, name: str, why: str):
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            need(
                isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                name,
                "must be a positive integer",
            )
        need(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            "must be a positive even number (RoPE rotates pairs of dimensions)",
        )
        need(
            self.q_lora_rank is None or self.q_lora_rank > 0,
            "q_lora_rank",
            "must be positive or None",
        )
        need(
            self.num_key_value_heads == self.num_attention_heads,
            "num_key_value_heads",
            "MLA expands K/V per head, so it must equal "
            f"num_attention_heads={self.num_attention_heads}",
        )
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must lie in [0, num_hidden_layers={self.num_hidden_layers}]",
        )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(
            self.first_k_dense_replace == 0 or self.intermediate_size > 0,
            "intermediate_size",
            "dense layers need a positive width",
        )
        # a fully dense model (first_k_dense_replace == num_hidden_layers) has no router
        if self.n_moe_layers:
            need(self.n_routed_experts >= 1, "n_routed_experts", "must be >= 1")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(
                self.scoring_func in ("sigmoid", "softmax"),
                "scoring_func",
                "must be 'sigmoid' or 'softmax'",
            )
            need(
                self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                "n_group",
                f"must divide n_routed_experts={self.n_routed_experts}",
            )
            need(
                1 <= self.topk_group <= self.n_group,
                "topk_group",
                f"must lie in [1, n_group={self.n_group}]",
            )
            per_group = self.n_routed_experts // self.n_group
            allowed = self.topk_group * per_group
            need(
                1 <= self.num_experts_per_tok <= allowed,
                "num_experts_per_tok",
                f"must lie in [1, {allowed}]: topk_group={self.topk_group} "
                f"groups of {per_group} experts",
            )
            if self.scoring_func == "sigmoid" and self.n_group > 1:
                need(
                    per_group >= 2,
                    "n_group",
                    "sigmoid routing scores a group by its top-2 experts, "
                    f"so each group needs >= 2 experts (n_routed_experts={self.n_routed_experts})",
                )
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs["type"] != "yarn":
                raise ConfigError(
                    f"rope_scaling.type={rs['type']!r}: only 'yarn' (or no scaling) is supported"
                )
            if not rs.get("factor") or rs["factor"] < 1:
                raise ConfigError(f"rope_scaling.factor={rs.get('factor')!r}: must be >= 1")
            if not rs.get("original_max_position_embeddings"):
                raise ConfigError(
                    "rope_scaling.original_max_position_embeddings: required for YaRN"
                )

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        for alias, name in _ALIASES.items():
            if alias in d:
                value = d.pop(alias)
                if d.get(name) is None:
                    d[name] = value
        # transformers 5.x: rope_parameters = {"rope_type", "rope_theta", + YaRN keys}
        rope_params = d.pop("rope_parameters", None)
        if rope_params:
            d.setdefault("rope_theta", rope_params.get("rope_theta", cls.rope_theta))
            if rope_params.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = rope_params
        # Configs written without the key mean transformers' default (1 MTP module); the loader
        # drops MTP when the weights are absent, since transformers' own save never writes them.
        d.setdefault("num_nextn_predict_layers", 1 if d.get("model_type") == "deepseek_v3" else 0)
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if known.get("q_lora_rank") == 0:  # the official ModelArgs writes 0 for "none"
            known["q_lora_rank"] = None
        if (
            isinstance(known.get("rope_scaling"), dict)
            and _rope_type(known["rope_scaling"]) == "default"
        ):
            known["rope_scaling"] = None
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config.json body: HF DeepseekV3 fields, readable by
        transformers 4.x and 5.x, vLLM and SGLang."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {
            **{
                k: v
                for k, v in self.extra.items()
                if k not in ("rope_parameters", "transformers_version")
            },
            **d,
        }
        d.update(
            model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"],
            rope_interleave=True,
            moe_layer_freq=1,
            ep_size=1,
            topk_method=self.topk_method if self.scoring_func == "sigmoid" else "greedy",
            seq_aux=True,
            use_cache=True,
            attention_dropout=0.0,
            pretraining_tp=1,
        )
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        return d

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file}")
        try:
            data = json.loads(file.read_text("utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> ModelConfig:
        """A preset (a JSON file of ModelConfig fields), with keyword overrides."""
        data = json.loads(Path(path).read_text("utf-8"))
        return cls.from_dict({**data, **overrides})

    def save_pretrained(self, path: str | os.PathLike) -> None:
        atomic_write_text(
            Path(path) / "config.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        )

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_type(rs: dict[str, Any]) -> str:
    return rs.get("rope_type") or rs.get("type") or "default"


def _normalise_rope_scaling(rs: dict[str, Any]) -> dict[str, Any]:
    """Keep the YaRN keys under the legacy names that every runtime reads."""
    out = {"type": _rope_type(rs)}
    out.update({k: rs[k] for k in _YARN_KEYS if rs.get(k) is not None})
    return out


# ---------------------------------------------------------------------------------------- vision
@dataclass
class VisionConfig:
    """The vision tower of a vision-language model (DeepSeek-VL2 style), stored as the
    `vision_config` key of config.json. The encoder fields are SigLIP's (transformers'
    `SiglipVisionConfig` reads them); the rest describe VL2's adaptor, tiling and preprocessing.

    DeepSeek-VL2 itself: hidden 1152, 27 layers, 16 heads, image_size 384, patch_size 14,
    candidate grids m x n with m*n <= 9 (max_tiles=9)."""

    hidden_size: int = 64  # ViT width
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_channels: int = 3
    image_size: int = 32  # side of one tile (and of the global thumbnail), pixels
    patch_size: int = 8
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    model_type: str = "siglip_vision_model"
    downsample_ratio: int = 2  # VL2's pixel shuffle: 2x2 patches -> one token
    projector_type: str = "downsample_mlp_gelu"
    max_tiles: int = 4  # local tiles per image: candidate grids m x n with m*n <= max_tiles
    image_token: str = "<image>"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pad_color: tuple[int, int, int] = (127, 127, 127)  # letterbox fill (the mean colour)
    max_image_pixels: int = 16_000_000  # images larger than this are refused before decoding
    initializer_range: float = 0.02

    def __post_init__(self):
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        self.pad_color = tuple(self.pad_color)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, why: str):
            if not cond:
                raise ConfigError(f"vision_config.{name}={getattr(self, name)!r}: {why}")

        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "max_tiles",
            "max_image_pixels",
        ):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name, "must be a positive integer")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            "num_attention_heads",
            f"must divide hidden_size={self.hidden_size}",
        )
        need(
            self.patch_size <= self.image_size,
            "patch_size",
            f"must be at most image_size={self.image_size} (a remainder is dropped, as in VL2)",
        )
        need(self.num_channels == 3, "num_channels", "images are RGB: must be 3")
        need(self.downsample_ratio == 2, "downsample_ratio", "only VL2's 2x2 pixel shuffle")
        need(
            self.projector_type == "downsample_mlp_gelu",
            "projector_type",
            "only 'downsample_mlp_gelu' (VL2's adaptor)",
        )
        need(self.hidden_act == "gelu_pytorch_tanh", "hidden_act", "only 'gelu_pytorch_tanh'")
        need(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean", "3 values")
        need(all(s > 0 for s in self.image_std), "image_std", "must be positive")

    @property
    def patch_grid(self) -> int:
        """Patches along one side of a tile (VL2: 384 / 14 -> 27)."""
        return self.image_size // self.patch_size

    @property
    def token_grid(self) -> int:
        """Tokens along one side of a tile after the 2x2 pixel shuffle (VL2: ceil(27/2) = 14)."""
        return math.ceil(self.patch_grid / self.downsample_ratio)

    @property
    def candidate_resolutions(self) -> list[tuple[int, int]]:
        """VL2's candidate (width, height) in pixels: (m*S, n*S) for m*n <= max_tiles."""
        s = self.image_size
        return [
            (m * s, n * s)
            for m in range(1, self.max_tiles + 1)
            for n in range(1, self.max_tiles + 1)
            if m * n <= self.max_tiles
        ]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("image_mean", "image_std", "pad_color"):
            d[k] = list(d[k])
        d["candidate_resolutions"] = [list(r) for r in self.candidate_resolutions]
        return d

    @classmethod
    def of(cls, cfg: ModelConfig) -> VisionConfig | None:
        """The vision config a (language) ModelConfig carries in config.json, or None."""
        d = cfg.extra.get("vision_config")
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ConfigError(f"vision_config must be an object, got {type(d).__name__}")
        return cls.from_dict(d)
