"""The vision tower of a DeepSeek-VL2-style vision-language model, and the model that joins it to
the (unchanged) language model.

    image ──► tiles (global thumbnail + local grid, see data/images.py)
          ──► ViT (SigLIP layout: patch conv + learned positions, pre-norm blocks, final norm)
              per tile: [g*g, C] patch features, g = image_size / patch_size
          ──► 2x2 pixel shuffle: [ceil(g/2)^2, 4C]        (F.unfold order, as VL2)
          ──► MLP adaptor: Linear(4C, d) -> GELU -> Linear(d, d)      d = LM hidden size
          ──► layout: global rows each + image_newline, view_seperator, local rows each + newline
          ──► written over the `<image>` placeholder positions of the token embeddings
          ──► Transformer (text path untouched)

Token count of one image with a tw x th local grid, h = w = ceil(g/2):
    h*(w+1)  +  1  +  (th*h)*(tw*w+1)          (VL2 at 384 px: 210 + 1 + 14*th*(14*tw+1))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import VisionConfig
from nanoseek.model.transformer import IGNORE_INDEX, LossOutput, Transformer


def image_token_count(vcfg: VisionConfig, grid: tuple[int, int]) -> int:
    """Sequence positions one image takes with a (tiles wide, tiles high) local grid."""
    tw, th = grid
    h = w = vcfg.token_grid
    return h * (w + 1) + 1 + (th * h) * (tw * w + 1)


# ------------------------------------------------------------------------------------ the encoder
class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(cfg.patch_grid**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] -> [N, g*g, C], patches row-major."""
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape

        def heads(t):
            return t.view(N, L, self.n_heads, C // self.n_heads).transpose(1, 2)

        q = heads(self.q_proj(x))
        k = heads(self.k_proj(x))
        v = heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(N, L, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-norm: x += attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoderLayers(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    """SigLIP's vision transformer without its pooling head; parameter names are transformers'
    `SiglipVisionModel.vision_model`, so its weights load there unchanged."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoderLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] (normalised) -> patch features [N, g*g, C]."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# ------------------------------------------------------------------------------------ the adaptor
def pixel_shuffle(features: torch.Tensor, grid: int) -> torch.Tensor:
    """[N, g*g, C] -> [N, ceil(g/2)^2, 4C]: each 2x2 block of patches becomes one token. An odd
    grid is zero-padded on the right and bottom first (VL2: 27 -> 28). Channel order is F.unfold's:
    channel-major, then (row, column) inside the block."""
    N, _, C = features.shape
    x = features.transpose(1, 2).reshape(N, C, grid, grid)
    pad = grid % 2
    if pad:
        x = F.pad(x, (0, pad, 0, pad))
    x = F.unfold(x, kernel_size=2, stride=2)  # [N, 4C, (g/2)^2]
    return x.transpose(1, 2)


class Projector(nn.Module):
    """VL2's `downsample_mlp_gelu` with depth 2: Linear(4C -> d), GELU, Linear(d -> d)."""

    def __init__(self, cfg: VisionConfig, lm_hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(4 * cfg.hidden_size, lm_hidden), nn.GELU(), nn.Linear(lm_hidden, lm_hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class ImageInput:
    """The images of a batch, preprocessed (data/images.py `preprocess`): all tiles stacked, and
    each image's local grid, in the order the images' placeholders appear in the batch (row by
    row). Image i owns 1 + tw*th consecutive tiles: its global thumbnail, then its local tiles
    row-major."""

    pixel_values: torch.Tensor  # [n_tiles, 3, S, S], normalised
    grids: list[tuple[int, int]]  # (tiles wide, tiles high) per image

    def __post_init__(self):
        need = sum(1 + tw * th for tw, th in self.grids)
        if self.pixel_values.shape[0] != need:
            raise ValueError(
                f"{len(self.grids)} image(s) with grids {self.grids} need {need} tiles, "
                f"got {self.pixel_values.shape[0]}"
            )


class VisionTower(nn.Module):
    """Encoder + adaptor + VL2's learned newline and view-separator vectors: images -> the
    LM-width embeddings that replace their placeholders."""

    def __init__(self, cfg: VisionConfig, lm_hidden: int):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.projector = Projector(cfg, lm_hidden)
        # names as in DeepSeek-VL2 (its spelling); initialised randn * d^-0.5 as there
        self.image_newline = nn.Parameter(torch.randn(lm_hidden) * lm_hidden**-0.5)
        self.view_seperator = nn.Parameter(torch.randn(lm_hidden) * lm_hidden**-0.5)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name in ("image_newline", "view_seperator"):
                continue
            if name.endswith(".bias"):
                p.zero_()
            elif "layer_norm" in name or "post_layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def tile_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, h, w, d] adapted features per tile."""
        g = self.config.patch_grid
        h = self.config.token_grid
        x = self.projector(pixel_shuffle(self.vision_model(pixels), g))
        return x.view(pixels.shape[0], h, h, -1)

    def forward(self, images: ImageInput) -> torch.Tensor:
        """-> [total image tokens, d]: every image's sequence (image_token_count), concatenated."""
        weight = self.vision_model.embeddings.patch_embedding.weight
        tiles = self.tile_embeddings(images.pixel_values.to(weight.device, weight.dtype))
        out = []
        start = 0
        for tw, th in images.grids:
            glob = tiles[start]  # [h, w, d]
            local = tiles[start + 1 : start + 1 + tw * th]
            start += 1 + tw * th
            h, w, d = glob.shape
            # local tiles row-major -> one [th*h, tw*w, d] canvas
            local = local.view(th, tw, h, w, d).permute(0, 2, 1, 3, 4).reshape(th * h, tw * w, d)
            out += [
                self._with_newlines(glob),
                self.view_seperator[None],
                self._with_newlines(local),
            ]
        return torch.cat(out)

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, d] -> [rows*(cols+1), d]: each row closed by image_newline."""
        rows = grid.shape[0]
        newline = self.image_newline.expand(rows, 1, -1)
        return torch.cat((grid, newline.to(grid.dtype)), dim=1).flatten(0, 1)


# --------------------------------------------------------------------------- the joined model
class VisionLanguageModel(nn.Module):
    """The language model (a plain nanoseek Transformer) plus the vision tower. Every image
    position of `input_ids` holds the `<image>` id; their embeddings are replaced, in order, by
    the tower's output (VL2's `masked_scatter`)."""

    def __init__(self, language_model: Transformer, vision: VisionTower, image_token_id: int):
        super().__init__()
        self.language_model = language_model
        self.vision = vision
        self.image_token_id = image_token_id
        # the LM's config carries the vision config, so config.json describes the whole model
        language_model.config.extra["vision_config"] = vision.config.to_dict()
        language_model.config.extra["image_token_id"] = image_token_id

    @classmethod
    def build(cls, lm_config, vcfg: VisionConfig, image_token_id: int) -> VisionLanguageModel:
        lm = Transformer(lm_config)
        return cls(lm, VisionTower(vcfg, lm_config.hidden_size), image_token_id)

    @property
    def config(self):
        return self.language_model.config

    def embed(self, input_ids: torch.Tensor, images: ImageInput | None) -> torch.Tensor:
        """Token embeddings [B, T, d] with the image features written over the placeholders."""
        x = self.language_model.embed_tokens(input_ids)
        mask = input_ids == self.image_token_id
        n_slots = int(mask.sum())
        if images is None or not images.grids:
            if n_slots:
                raise ValueError(f"input has {n_slots} <image> positions but no images")
            return x
        feats = self.vision(images)
        if feats.shape[0] != n_slots:
            raise ValueError(
                f"the images give {feats.shape[0]} tokens but the input has {n_slots} <image> "
                "positions (expand each placeholder with data/images.py expand_image_tokens)"
            )
        return x.masked_scatter(mask.unsqueeze(-1), feats.to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        mtp_weight: float = 0.3,
        images: ImageInput | None = None,
        logits_at: torch.Tensor | None = None,
    ):
        """input_ids [B, T] -> logits [B, T, V] (or [N, V] at logits_at, as the Transformer's);
        with targets, compute_loss's LossOutput. The positional arguments are the Transformer's,
        so the trainer's `model(x, y, mtp_weight)` call works unchanged; images come by keyword."""
        if targets is not None:
            return self.compute_loss(input_ids, targets, mtp_weight, images=images)
        embeds = self.embed(input_ids, images)
        h, _ = self.language_model.hidden_states(input_ids, inputs_embeds=embeds)
        return self.language_model.logits(h, logits_at)

    def compute_loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        mtp_weight: float = 0.3,
        images: ImageInput | None = None,
    ) -> LossOutput:
        """The language model's loss, on text targets only: a target that is an image position
        carries no loss, whatever the data said."""
        targets = targets.masked_fill(targets == self.image_token_id, IGNORE_INDEX)
        embeds = self.embed(input_ids, images)
        return self.language_model.compute_loss(
            input_ids, targets, mtp_weight, inputs_embeds=embeds
        )

    def num_parameters(self, active: bool = False) -> int:
        """The language model's count (see Transformer.num_parameters) plus the whole tower."""
        tower = sum(p.numel() for p in self.vision.parameters())
        return self.language_model.num_parameters(active=active) + tower

    # the MoE bookkeeping the trainer calls after each step: the language model's
    def moe_layers(self):
        return self.language_model.moe_layers()

    def expert_load(self) -> torch.Tensor:
        return self.language_model.expert_load()

    def update_router_biases(self, gamma: float, loads: torch.Tensor | None = None) -> None:
        self.language_model.update_router_biases(gamma, loads)

    def freeze(self, *, encoder: bool = False, projector: bool = False, language: bool = False):
        """Set which parts train (VL2's stage 1 trains encoder + adaptor with the LM frozen)."""
        parts = {
            "vision_model": (self.vision.vision_model.parameters(), encoder),
            "projector": (
                [
                    *self.vision.projector.parameters(),
                    self.vision.image_newline,
                    self.vision.view_seperator,
                ],
                projector,
            ),
            "language": (self.language_model.parameters(), language),
        }
        for params, frozen in parts.values():
            for p in params:
                p.requires_grad_(not frozen)
