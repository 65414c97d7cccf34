"""Images in chat requests: the `image_url` content parts of a request's messages -> decoded, tiled
images for the engine, each bad image a FormatError naming its field
(`messages.N.content.M.image_url`).

Only base64 `data:` URLs are read; a remote `http(s)` URL is refused, since the server makes no
outside calls. Decoding (data.images.load_image: format, pixel and byte limits, truncated or corrupt
data) is blocking work: call `load_request_images` on a worker thread.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from nanoseek.data.images import (
    ALLOWED_FORMATS,
    MAX_IMAGE_BYTES,
    ImageError,
    image_input,
    load_image,
)
from nanoseek.serve.chat_format import FormatError
from nanoseek.serve.protocol import ImageLimits, ImageURLPart, Message

TEXT_ONLY = "this model does not read images (its checkpoint has no vision tower)"


# the MIME type of each format data.images.load_image reads (MPO is a JPEG a camera wrote)
MIME_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}


def image_limits(config, vcfg) -> ImageLimits:
    """The limits a request's images meet (GET /v1/models shows them, so a client such as the web
    chat can check an image before it sends it). config: ServerConfig; vcfg: VisionConfig."""
    return ImageLimits(
        max_images_per_request=config.max_images_per_request,
        max_image_pixels=vcfg.max_image_pixels,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_body_bytes=config.max_body_bytes,
        formats=list(
            dict.fromkeys(MIME_TYPES.get(f, f"image/{f.lower()}") for f in ALLOWED_FORMATS)
        ),
    )


def image_urls(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(field name, URL) of every image part, in prompt order. Images go in user messages only."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            continue
        for j, part in enumerate(m.content):
            if isinstance(part, ImageURLPart):
                param = f"messages.{i}.content.{j}.image_url"
                if m.role != "user":
                    raise FormatError(f"images go in user messages, not {m.role} ones", param)
                out.append((param, part.image_url.url))
    return out


def check_urls(urls: Sequence[tuple[str, str]], limit: int, vision) -> None:
    """The cheap checks, before anything is decoded: a model that reads images, the count, the
    URLs' form."""
    if not urls:
        return
    if vision is None:
        raise FormatError(TEXT_ONLY, urls[0][0])
    if len(urls) > limit:
        raise FormatError(
            f"{len(urls)} images in one request; this server takes at most {limit}", urls[limit][0]
        )
    for param, url in urls:
        _data_url_payload(url, param)


def load_request_images(urls: Sequence[tuple[str, str]], vcfg):
    """Decode and tile a request's images (blocking) -> an ImageInput in prompt order."""
    images = []
    for param, url in urls:
        try:
            data = base64.b64decode(_data_url_payload(url, param), validate=True)
        except (binascii.Error, ValueError):
            raise FormatError("the image data: URL is not valid base64", param) from None
        try:
            images.append(load_image(data, max_pixels=vcfg.max_image_pixels))
        except ImageError as e:
            raise FormatError(f"bad image: {e}", param) from None
    return image_input(images, vcfg)


def _data_url_payload(url: str, param: str) -> str:
    """The base64 text of a data URL (its form checked, not yet decoded)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise FormatError(
            "remote images are refused: this server fetches nothing from outside; send the "
            "image as a data: URL (data:image/png;base64,...)",
            param,
        )
    if scheme != "data":
        raise FormatError("an image must be a data: URL (data:image/png;base64,...)", param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise FormatError("an image data: URL must be base64 (data:image/png;base64,...)", param)
    return payload
