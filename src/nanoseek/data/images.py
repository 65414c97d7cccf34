"""Images in: the one image loader (with its limits and clear errors), DeepSeek-VL2's dynamic tiling
and normalisation, and the expansion of `<image>` placeholders into one position per image token.

Tiling (VL2's `select_best_resolution`): among the candidate canvases (m*S, n*S) with m*n <=
max_tiles, pick the one where the image, scaled to fit, keeps the most pixels (capped at its own
size), ties broken by the least padding. The image is letterboxed (aspect kept, centred, mean-colour
fill) onto that canvas and cut into S x S tiles row-major; a global thumbnail (the whole image
letterboxed to S x S) comes first. With three or more images in one prompt, each gets the global
view plus a single 1 x 1 local tile, as in VL2.

Prompt format: the text carries ONE `<image>` per image (as VL2's prompts do); `expand_image_tokens`
turns each into `image_token_count` copies of the `<image>` id, newline and separator positions
included, and the model writes the image features over them.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nanoseek.config import VisionConfig
from nanoseek.model.vision import ImageInput, image_token_count

ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP")  # MPO: phone cameras' JPEG
MAX_IMAGE_BYTES = 20 << 20  # 20 MiB of encoded data
MAX_CROPPING_IMAGES = 2  # VL2 tiles an image only when the prompt has at most this many


class ImageError(ValueError):
    """An image that cannot be used; the message says what is wrong with it."""


# ------------------------------------------------------------------------------------ loading
def load_image(
    source: bytes | str | os.PathLike,
    max_pixels: int = VisionConfig.max_image_pixels,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> Image.Image:
    """Encoded image bytes (or a file path) -> an RGB PIL image, fully decoded.

    Raises ImageError for: no data, too many bytes, a format outside ALLOWED_FORMATS, data that is
    not an image, a decompression bomb (width*height over max_pixels, checked from the header before
    any pixel is decoded), truncated or corrupt pixel data. Transparency is flattened onto white, an
    animation keeps its first frame, EXIF orientation is applied."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no image file at {path}")
        if path.stat().st_size > max_bytes:
            raise ImageError(
                f"{path}: {path.stat().st_size} bytes, over the {max_bytes}-byte limit"
            )
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise ImageError(f"expected image bytes or a path, got {type(source).__name__}")
    if not data:
        raise ImageError("empty image data")
    if len(data) > max_bytes:
        raise ImageError(f"image data is {len(data)} bytes, over the {max_bytes}-byte limit")
    with warnings.catch_warnings():
        # we enforce our own pixel limit; Pillow's warning (and its error at twice its limit) would
        # otherwise fire first with a message about its own default
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=None)
        except Image.DecompressionBombError:
            raise ImageError(f"image has too many pixels (limit {max_pixels})") from None
        except UnidentifiedImageError:
            raise ImageError(
                "not a recognisable image; supported formats: " + ", ".join(ALLOWED_FORMATS)
            ) from None
        if img.format not in ALLOWED_FORMATS:
            raise ImageError(
                f"unsupported image format {img.format}; supported: {', '.join(ALLOWED_FORMATS)}"
            )
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{max_pixels} (a decompression bomb, or simply too large)"
            )
        try:
            img.seek(0)
            img.load()
        except OSError as e:
            if "truncated" in str(e):
                raise ImageError(f"truncated {img.format} data: {e}") from None
            raise ImageError(f"corrupt {img.format} data: {e}") from None
        except (SyntaxError, ValueError, EOFError) as e:  # Pillow's parsers raise these too
            raise ImageError(f"corrupt {img.format} data: {e}") from None
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# ------------------------------------------------------------------------------------ tiling
def select_best_resolution(
    size: tuple[int, int], candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """VL2's rule: the (W, H) that keeps the most of the image's pixels when it is scaled to fit,
    effective = min(floor(w*s) * floor(h*s), w*h) with s = min(W/w, H/h); ties -> least waste."""
    w, h = size
    best = None
    best_key = None
    for W, H in candidates:
        scale = min(W / w, H / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = W * H - effective
        key = (effective, -wasted)
        if best_key is None or key > best_key:
            best = (W, H)
            best_key = key
    return best


def tile_grid(size: tuple[int, int], vcfg: VisionConfig, cropping: bool = True) -> tuple[int, int]:
    """(tiles wide, tiles high) of an image's local view."""
    if not cropping:
        return (1, 1)
    W, H = select_best_resolution(size, vcfg.candidate_resolutions)
    return (W // vcfg.image_size, H // vcfg.image_size)


def _normalise(img: Image.Image, vcfg: VisionConfig) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(vcfg.image_mean).view(3, 1, 1)
    std = torch.tensor(vcfg.image_std).view(3, 1, 1)
    return (x - mean) / std


def preprocess(
    img: Image.Image, vcfg: VisionConfig, cropping: bool = True
) -> tuple[torch.Tensor, tuple[int, int]]:
    """An RGB image -> (tiles [1 + tw*th, 3, S, S]: global thumbnail then local tiles row-major,
    grid (tw, th))."""
    S = vcfg.image_size
    tw, th = tile_grid(img.size, vcfg, cropping)
    glob = ImageOps.pad(img, (S, S), color=vcfg.pad_color)
    canvas = ImageOps.pad(img, (tw * S, th * S), color=vcfg.pad_color)
    tiles = [glob] + [
        canvas.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)) for r in range(th) for c in range(tw)
    ]
    return torch.stack([_normalise(t, vcfg) for t in tiles]), (tw, th)


def image_input(images: Sequence[Image.Image], vcfg: VisionConfig) -> ImageInput:
    """The images of one prompt (or a batch, in placeholder order), tiled as VL2 tiles a prompt."""
    cropping = len(images) <= MAX_CROPPING_IMAGES
    parts = [preprocess(img, vcfg, cropping) for img in images]
    if not parts:
        S = vcfg.image_size
        return ImageInput(torch.zeros(0, 3, S, S), [])
    return ImageInput(torch.cat([p for p, _ in parts]), [g for _, g in parts])


def merge_inputs(inputs: Sequence[ImageInput]) -> ImageInput:
    """Several prompts' images as one batch input, in order."""
    grids = [g for i in inputs for g in i.grids]
    return ImageInput(torch.cat([i.pixel_values for i in inputs]), grids)


# ------------------------------------------------------------------------------- placeholders
def expand_image_tokens(
    ids: Sequence[int],
    grids: Sequence[tuple[int, int]],
    image_id: int,
    vcfg: VisionConfig,
    trainable: Sequence[bool] | None = None,
) -> tuple[list[int], list[bool] | None]:
    """Replace the k-th `<image>` id by image_token_count(grids[k]) copies of it (never trainable).
    Raises ImageError when the placeholders and the images do not pair up."""
    slots = [i for i, t in enumerate(ids) if t == image_id]
    if len(slots) != len(grids):
        raise ImageError(
            f"the text has {len(slots)} <image> placeholder(s) for {len(grids)} image(s)"
        )
    out: list[int] = []
    mask: list[bool] = []
    k = 0
    for i, t in enumerate(ids):
        if t == image_id:
            n = image_token_count(vcfg, grids[k])
            k += 1
            out += [image_id] * n
            mask += [False] * n
        else:
            out.append(t)
            mask.append(bool(trainable[i]) if trainable is not None else False)
    return out, (mask if trainable is not None else None)


def image_id_of(tok) -> int:
    image_id = tok.special_ids.get("image")
    if image_id is None:
        raise ImageError("this tokenizer has no <image> token (nanoseek tokenizer revision 2 has)")
    return image_id


def encode_image_conversation(
    tok, messages: list[Mapping], images: Sequence[Image.Image], vcfg: VisionConfig
) -> tuple[list[int], list[bool], ImageInput]:
    """A training conversation whose user turns write `<image>` where each image goes ->
    (expanded ids, trainable mask, the images' input). Trusted text only: `<image>` in the content
    becomes the placeholder token."""
    from nanoseek.data.chat_tokens import tokenize_conversation

    ids, trainable = tokenize_conversation(tok, messages)
    inputs = image_input(images, vcfg)
    ids, trainable = expand_image_tokens(ids, inputs.grids, image_id_of(tok), vcfg, trainable)
    return ids, trainable, inputs


def image_prompt_ids(
    tok,
    prompt: str,
    images: Sequence[Image.Image],
    vcfg: VisionConfig,
    thinking: bool = True,
) -> tuple[list[int], ImageInput]:
    """A one-turn prompt ready for generation, its placeholders expanded."""
    from nanoseek.data.chat_tokens import prompt_ids

    ids = prompt_ids(tok, prompt, thinking=thinking)
    inputs = image_input(images, vcfg)
    ids, _ = expand_image_tokens(ids, inputs.grids, image_id_of(tok), vcfg)
    return ids, inputs
