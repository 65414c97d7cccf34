"""Hugging Face DeepseekV3 checkpoint directories: the only module that
knows the on-disk tensor names.

On disk (what transformers, vLLM and the official DeepSeek releases use):
    model.layers.L.mlp.experts.N.{gate,up,down}_proj.weight   one tensor per expert
    model.layers.{num_hidden_layers + k}.*                      MTP module k (enorm, hnorm,
                                                                eh_proj, shared_head, and a
                                                                whole block)
In memory the experts of a layer are stacked ([E, 2I, d] and [E, d, I]) and MTP lives in
`model.mtp`.

load_checkpoint() is the one loader the commands use: the model (in a dtype, or int8), its tokenizer
and its sampling defaults.

A vision-language model (model/vision.py) is the same directory plus its vision tower: config.json
gains `vision_config` and `image_token_id`, `vision.safetensors` holds the tower (keys
`vision_model.*` as transformers' SiglipVisionModel names them, `projector.layers.{0,2}.*`,
`image_newline`, `view_seperator`), and `preprocessor_config.json` the image settings. The language
part stays a complete DeepseekV3 checkpoint: load_model (and transformers, and GGUF export) read it
and leave the tower alone (docs/multimodal.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.io import atomic_file, atomic_write_text
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
VISION_FILE = "vision.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
VISION_KEYS = ("vision_config", "image_token_id")  # what config.json adds for a vision tower
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
# what a command takes from generation_config.json
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k")
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# duplicates of the main embedding and head
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_MTP_OWN = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
FP8_BLOCK = 128


class CheckpointError(RuntimeError):
    """A checkpoint whose tensors do not match its config; the message lists every mismatch."""


# ---------------------------------------------------------------------- name mapping
def _disk_prefix(cfg: ModelConfig, name: str) -> str:
    """Our parameter name -> its HF name (experts are still stacked here)."""
    if name == "lm_head.weight":
        return name
    if name.startswith("mtp."):
        _, k, rest = name.split(".", 2)
        layer = cfg.num_hidden_layers + int(k)
        rest = rest.removeprefix("block.")
        if rest == "norm.weight":
            rest = "shared_head.norm.weight"
        return f"model.layers.{layer}.{rest}"
    return f"model.{name}"


def _disk_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, view into the model's own tensor) for every tensor the model owns on disk:
    stacked experts as one view per expert, not the MTP layers' copies of embedding and head."""
    cfg = model.config
    named = dict(model.named_parameters(remove_duplicate=False))
    # persistent and not: only the bias survives the filter below
    named.update(model.named_buffers())
    for name, tensor in named.items():
        if name in ("rope_cos", "rope_sin") or name.endswith("expert_load"):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        disk = _disk_prefix(cfg, name)
        if disk.endswith("mlp.experts.gate_up_proj"):
            base, I = disk.removesuffix(".gate_up_proj"), cfg.moe_intermediate_size
            for e in range(cfg.n_routed_experts):
                yield f"{base}.{e}.gate_proj.weight", tensor[e, :I]
                yield f"{base}.{e}.up_proj.weight", tensor[e, I:]
        elif disk.endswith("mlp.experts.down_proj"):
            base = disk.removesuffix(".down_proj")
            for e in range(cfg.n_routed_experts):
                yield f"{base}.{e}.down_proj.weight", tensor[e]
        else:
            yield disk, tensor


def to_hf_state_dict(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every tensor a checkpoint holds, experts split one by one."""
    yield from _disk_tensors(model)
    # the official layout repeats embedding and head inside each MTP layer
    for k in range(len(model.mtp)):
        layer = model.config.num_hidden_layers + k
        yield f"model.layers.{layer}.embed_tokens.weight", model.embed_tokens.weight
        yield f"model.layers.{layer}.shared_head.head.weight", model.lm_head.weight


# ---------------------------------------------------------------------- save
def _save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_model(
    model: Transformer,
    path: str | os.PathLike,
    tokenizer=None,
    max_shard_size: int = 4 << 30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an HF DeepseekV3 directory: config.json, safetensors (sharded past
    max_shard_size bytes), generation_config.json and, if given, the tokenizer
    files. Every file is written atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in to_hf_state_dict(model):
        t = t.detach().to("cpu")
        if (
            dtype is not None
            and t.is_floating_point()
            and not name.endswith("e_score_correction_bias")
        ):
            t = t.to(dtype)
        # MTP's copies of embedding and head: safetensors wants one tensor per storage
        if (t.data_ptr(), tuple(t.shape)) in seen:
            t = t.clone()
        seen.add((t.data_ptr(), tuple(t.shape)))
        tensors[name] = t.contiguous()
    on_disk_dtype = dtype or model.embed_tokens.weight.dtype
    cfg.replace(torch_dtype=str(on_disk_dtype).removeprefix("torch.")).save_pretrained(path)

    shards = []
    current = {}
    size = 0
    for name in sorted(tensors, key=_natural_key):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)

    metadata = {"format": "pt"}
    stale = {p.name for p in path.glob("model*.safetensors")} | {
        p.name for p in path.glob(INDEX_FILE)
    }
    if len(shards) == 1:
        _save_safetensors(shards[0], path / SINGLE_FILE, metadata)
        written = {SINGLE_FILE}
    else:
        weight_map, written = {}, set()
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save_safetensors(shard, path / fname, metadata)
            weight_map.update(dict.fromkeys(shard, fname))
            written.add(fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        # last: it makes the set valid
        atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        written.add(INDEX_FILE)
    for name in stale - written:  # a previous save with another sharding
        (path / name).unlink(missing_ok=True)

    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
    }
    atomic_write_text(path / GENERATION_FILE, json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def _natural_key(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------- load
def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text("utf-8"))
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{path / INDEX_FILE} names shard files that do not exist: {missing}"
            )
        return [path / f for f in files]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(
        f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE})"
    )


class _LazyTensors:
    """name -> tensor across shards, read through safetensors' memory map one tensor at a time."""

    def __init__(self, files: list[Path]):
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> list[int]:
        return list(self.where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        t = self.where[name].get_tensor(name)
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        # DeepSeek's FP8 release: 128x128 blocks, each with its own scale
        if scale_name in self.where:
            scale = self.where[scale_name].get_tensor(scale_name).float()
            rows, cols = t.shape
            scale = scale.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[
                :, :cols
            ]
            t = t.float() * scale
        return t


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> Transformer:
    """Load any HF DeepseekV3 (or V2) directory. dtype=None keeps the dtype of the tensors on disk.

    Every tensor is checked against the config first; a missing, unexpected or wrongly shaped tensor
    raises a CheckpointError that lists all of them, before anything is loaded.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_pretrained(path)
    if "vision_config" in cfg.extra:
        log.info(
            "%s: a vision-language checkpoint; load_model loads its language model only (text in, "
            "text out); load_vision_language_model loads the vision tower too",
            path,
        )
        cfg.extra = {k: v for k, v in cfg.extra.items() if k not in VISION_KEYS}
    lazy = _LazyTensors(_checkpoint_files(path))
    disk_keys = {k for k in lazy.keys() if not k.endswith(".weight_scale_inv")}

    # MTP weights are optional: transformers' own save_pretrained drops
    # them while keeping the config field.
    mtp_prefixes = [
        f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers)
    ]
    if mtp_prefixes and not any(k.startswith(tuple(mtp_prefixes)) for k in disk_keys):
        log.info(
            "%s: config has %d MTP module(s) but the weights hold none; loading without MTP",
            path,
            cfg.num_nextn_predict_layers,
        )
        cfg = cfg.replace(num_nextn_predict_layers=0)

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: list(t.shape) for name, t in to_hf_state_dict(model)}
    # old remote-code checkpoints
    disk_keys -= {k for k in disk_keys if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        disk_keys.discard("lm_head.weight")  # some writers store the tied head anyway
    missing = sorted(set(expected) - disk_keys, key=_natural_key)
    unexpected = sorted(disk_keys - set(expected), key=_natural_key)
    wrong = [
        f"{k}: checkpoint {lazy.shape(k)} vs model {expected[k]}"
        for k in sorted(set(expected) & disk_keys, key=_natural_key)
        if lazy.shape(k) != expected[k]
    ]
    problems = [
        ("missing", missing),
        ("unexpected", unexpected if strict else []),
        ("wrong shape", wrong),
    ]
    if any(items for _, items in problems):
        lines = [f"checkpoint {path} does not match its config.json:"]
        for label, items in problems:
            if items:
                shown = items[:20] + (
                    [f"... and {len(items) - 20} more"] if len(items) > 20 else []
                )
                lines.append(f"  {label} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))

    disk_dtype = getattr(torch, str(cfg.torch_dtype).removeprefix("torch."), torch.float32)
    model = model.to_empty(device=device)
    model.to(
        dtype
        or (
            disk_dtype
            if disk_dtype.is_floating_point and disk_dtype.itemsize >= 2
            else torch.float32
        )
    )
    model.rebuild_derived_state()
    _copy_into(model, lazy)
    return model.eval()


def load_weights_into(model: Transformer, path: str | os.PathLike) -> None:
    """Overwrite an existing model's weights (and router biases) from a
    checkpoint directory of the same config."""
    _copy_into(model, _LazyTensors(_checkpoint_files(Path(path))))


@torch.no_grad()
def _copy_into(model: Transformer, lazy: _LazyTensors) -> None:
    # targets are views: copying into one fills the stacked tensor
    for disk, target in _disk_tensors(model):
        target.copy_(lazy.get(disk))


# ---------------------------------------------------------------------- what a command loads
@dataclass
class Checkpoint:
    """A checkpoint directory loaded for use: what `generate`, `chat`, `serve` and `info` need."""

    model: Transformer  # with int8=True: int8 modules in place of the linear layers and experts
    tokenizer: Tokenizer | None  # None when the directory has no tokenizer.json
    defaults: dict = field(default_factory=dict)  # sampling defaults from generation_config.json


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    int8: bool = False,
    device: str | torch.device = "cpu",
    vision: bool = False,
) -> Checkpoint:
    """Load a checkpoint directory's model, tokenizer and sampling defaults. dtype (a torch dtype or
    its name, e.g. "bfloat16") defaults to the dtype on disk; int8 reads model.int8.safetensors when
    the directory has one and quantizes the loaded model otherwise.

    vision=True (the commands that can take images: serve, chat): a checkpoint whose config.json
    has a `vision_config` loads as a VisionLanguageModel, tower included (its language model int8
    if asked). Otherwise, and for text-only checkpoints, the model is the language model alone."""
    # imported here: engine/ builds on this module (quant.load_quantized calls load_model)
    from nanoseek.engine.quant import INT8_FILE, load_quantized, quantize_model

    path = Path(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if vision and "vision_config" in ModelConfig.from_pretrained(path).extra:
        model = load_vision_language_model(path, device=device, dtype=dtype)
        if int8:
            quantize_model(model.language_model, inplace=True)
    elif int8 and (path / INT8_FILE).is_file():
        model = load_quantized(path, device=device, dtype=dtype)
    else:
        model = load_model(path, device=device, dtype=dtype)
        if int8:
            model = quantize_model(model, inplace=True)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    gen = path / GENERATION_FILE
    saved = json.loads(gen.read_text("utf-8")) if gen.is_file() else {}
    defaults = {k: saved[k] for k in SAMPLING_DEFAULTS if k in saved}
    return Checkpoint(model, tokenizer, defaults)


# ---------------------------------------------------------------------- vision-language models
def save_vision_language_model(
    vlm, path: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None
) -> Path:
    """A DeepseekV3 directory (save_model; its config.json carries `vision_config`), plus
    vision.safetensors and preprocessor_config.json."""
    from nanoseek.data.images import MAX_CROPPING_IMAGES

    path = save_model(vlm.language_model, path, tokenizer=tokenizer, dtype=dtype)
    tensors = {}
    for name, t in vlm.vision.state_dict().items():
        t = t.detach().to("cpu")
        tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    _save_safetensors(tensors, path / VISION_FILE, {"format": "pt"})
    v = vlm.vision.config
    processor = {  # VL2's processor keys, for readers outside nanoseek (config.json rules)
        "processor_class": "nanoseek.data.images",
        "candidate_resolutions": [list(r) for r in v.candidate_resolutions],
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "downsample_ratio": v.downsample_ratio,
        "image_mean": list(v.image_mean),
        "image_std": list(v.image_std),
        "background_color": list(v.pad_color),
        "cropping_max_images": MAX_CROPPING_IMAGES,
        "image_token": v.image_token,
        "image_token_id": vlm.image_token_id,
        "max_image_pixels": v.max_image_pixels,
        "tile_tag": "2D",
        "global_view_pos": "head",
    }
    atomic_write_text(path / PREPROCESSOR_FILE, json.dumps(processor, indent=2) + "\n")
    return path


def load_vision_language_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load a directory that save_vision_language_model wrote: the language model (load_model,
    checked as always) and the vision tower, checked tensor by tensor against vision_config."""
    from nanoseek.config import VisionConfig
    from nanoseek.model.vision import VisionLanguageModel, VisionTower

    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    vcfg = VisionConfig.of(cfg)
    if vcfg is None:
        raise CheckpointError(f"{path} is a text-only checkpoint: config.json has no vision_config")
    image_token_id = cfg.extra.get("image_token_id")
    if not isinstance(image_token_id, int):
        raise CheckpointError(
            f"{path}/config.json: vision_config without an integer image_token_id"
        )
    if not (path / VISION_FILE).is_file():
        raise CheckpointError(f"{path}: config.json has a vision_config but no {VISION_FILE}")
    lm = load_model(path, device=device, dtype=dtype)
    with torch.device("meta"):
        tower = VisionTower(vcfg, cfg.hidden_size)
    expected = {k: list(t.shape) for k, t in tower.state_dict().items()}
    lazy = _LazyTensors([path / VISION_FILE])
    disk = lazy.keys()
    missing = sorted(set(expected) - disk)
    unexpected = sorted(disk - set(expected))
    wrong = [
        f"{k}: checkpoint {lazy.shape(k)} vs model {expected[k]}"
        for k in sorted(set(expected) & disk)
        if lazy.shape(k) != expected[k]
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path / VISION_FILE} does not match vision_config: missing {missing}, "
            f"unexpected {unexpected}, wrong shape {wrong}"
        )
    tower = tower.to_empty(device=device).to(dtype or lm.embed_tokens.weight.dtype)
    with torch.no_grad():
        for k, t in tower.state_dict(keep_vars=True).items():
            t.copy_(lazy.get(k))
    return VisionLanguageModel(lm, tower, image_token_id).eval()
