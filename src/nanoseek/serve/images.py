"""Images in chat requests: the `image_url` content parts of a request's messages -> decoded, tiled
images for the engine, each bad image a FormatError naming its field
(`messages.N.content.M.image_url`).

Base64 `data:` URLs are read as they are. A remote `http(s)` URL is refused unless its operator
listed its host (`RemoteImages`, `nanoseek serve --remote-image-hosts`): by default the server makes
no outside calls. A listed host's image is fetched with a timeout and the byte limit, following
redirects only to listed hosts. Fetching and decoding (data.images.load_image: format, pixel and
byte limits, truncated or corrupt data) are blocking work: call `load_request_images` on a worker
thread.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from nanoseek.data.images import (
    ALLOWED_FORMATS,
    MAX_IMAGE_BYTES,
    ImageError,
    image_input,
    load_image,
)
from nanoseek.serve.chat_format import FormatError
from nanoseek.serve.config import host_name
from nanoseek.serve.protocol import ImageLimits, ImageURLPart, Message

TEXT_ONLY = "this model does not read images (its checkpoint has no vision tower)"
DATA_URL_HINT = "send the image as a data: URL (data:image/png;base64,...)"


@dataclass(frozen=True)
class RemoteImages:
    """Which http(s) image URLs the server fetches: those whose host is in `hosts` (lowercase
    names; "*": any host). Empty, the default: none."""

    hosts: tuple[str, ...] = ()
    timeout: float = 10.0  # seconds to connect and to wait for each read
    max_redirects: int = 3

    def allows(self, url: str) -> bool:
        host = _host(url)
        return bool(host) and ("*" in self.hosts or host in self.hosts)

    def refusal(self, url: str) -> str:
        """Why `url` is not fetched (for a URL that `allows` refuses)."""
        if not self.hosts:
            return (
                "remote images are refused: this server fetches nothing from outside (its "
                f"operator can allow hosts with --remote-image-hosts); {DATA_URL_HINT}"
            )
        host = _host(url)
        if host is None:
            return f"the image URL is not a valid http(s) URL; {DATA_URL_HINT}"
        return (
            f"remote images are refused from host {host}: this server fetches images only from "
            f"{', '.join(self.hosts)}; {DATA_URL_HINT}"
        )

    def fetch(self, url: str) -> bytes:
        """The image's bytes (at most MAX_IMAGE_BYTES). Raises ImageError on a refused redirect,
        an HTTP error, a timeout or too many bytes."""
        opener = urllib.request.build_opener(_ListedRedirects(self))
        request = urllib.request.Request(url, headers={"User-Agent": "nanoseek"})
        try:
            with opener.open(request, timeout=self.timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
                    raise ImageError(
                        f"the image is {declared} bytes, over the {MAX_IMAGE_BYTES}-byte limit"
                    )
                data = response.read(MAX_IMAGE_BYTES + 1)
        except urllib.error.HTTPError as e:
            raise ImageError(f"fetching the image got HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:  # timeouts, refusals, bad URLs
            reason = getattr(e, "reason", e)
            raise ImageError(f"could not fetch the image: {reason}") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"the image is over the {MAX_IMAGE_BYTES}-byte limit")
        return data


def _host(url: str) -> str | None:
    """An http(s) URL's host as ServerConfig lists hosts (config.host_name), else None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None
    if _scheme(url) not in ("http", "https") or not host:
        return None
    return host_name(host)


class _ListedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects followed only to hosts the operator listed, at most `max_redirects` of them."""

    def __init__(self, remote: RemoteImages):
        super().__init__()
        self.remote = remote
        self.max_redirections = remote.max_redirects

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.remote.allows(newurl):
            host = _host(newurl) or newurl
            raise ImageError(f"the image URL redirects to {host}, which is not an allowed host")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


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


def check_urls(
    urls: Sequence[tuple[str, str]], limit: int, vision, remote: RemoteImages = RemoteImages()
) -> None:
    """The cheap checks, before anything is fetched or decoded: a model that reads images, the
    count, the URLs' form (a data URL, or a remote one that `remote` allows)."""
    if not urls:
        return
    if vision is None:
        raise FormatError(TEXT_ONLY, urls[0][0])
    if len(urls) > limit:
        raise FormatError(
            f"{len(urls)} images in one request; this server takes at most {limit}", urls[limit][0]
        )
    for param, url in urls:
        if not _remote(url):
            _data_url_payload(url, param)
        elif not remote.allows(url):
            raise FormatError(remote.refusal(url), param)


def load_request_images(
    urls: Sequence[tuple[str, str]], vcfg, remote: RemoteImages = RemoteImages()
):
    """Fetch (remote URLs that `remote` allows), decode and tile a request's images (blocking)
    -> an ImageInput in prompt order."""
    images = []
    for param, url in urls:
        try:
            if _remote(url):
                if not remote.allows(url):
                    raise FormatError(remote.refusal(url), param)
                data = remote.fetch(url)
            else:
                data = _data_url_bytes(url, param)
            images.append(load_image(data, max_pixels=vcfg.max_image_pixels))
        except ImageError as e:
            raise FormatError(f"bad image: {e}", param) from None
    return image_input(images, vcfg)


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


def _remote(url: str) -> bool:
    return _scheme(url) in ("http", "https")


def _data_url_bytes(url: str, param: str) -> bytes:
    try:
        return base64.b64decode(_data_url_payload(url, param), validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("the image data: URL is not valid base64", param) from None


def _data_url_payload(url: str, param: str) -> str:
    """The base64 text of a data URL (its form checked, not yet decoded)."""
    if _scheme(url) != "data":
        raise FormatError(f"an image must be a data: URL or an http(s) one; {DATA_URL_HINT}", param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise FormatError("an image data: URL must be base64 (data:image/png;base64,...)", param)
    return payload
