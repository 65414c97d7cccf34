"""ServerConfig: where the server listens, who may use it, and the limits that
keep one client from hurting others."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000  # 0: any free port (the URL is printed)
    # if set, /v1/* needs "Authorization: Bearer KEY" (or "X-Api-Key: KEY")
    api_key: str | None = None
    model_name: str = "nanoseek"  # what /v1/models lists and requests must name (if they name one)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_tokens: int = 4096  # the most tokens one completion may ask for
    max_concurrent_requests: int = 64  # requests generating at once; more wait in the queue
    max_queue: int = 256  # requests waiting for a slot; more get 429
    max_sequences_per_request: int = 1024  # prompts x n of one request; more: 429 (lm-eval fits)
    max_queued_sequences: int = 4096  # prompts x n of all requests running or queued; more get 429
    max_queued_tokens: int = 1 << 23  # (prompt + max_tokens) x n of all of them; more get 429
    max_images_per_request: int = 4  # image content parts in one chat request; more get 400
    # seconds from arrival to the last token; then the request is cancelled
    request_timeout: float = 600.0
    # seconds between SSE keep-alive comments while a stream has nothing to send
    keepalive: float = 15.0
    thinking: bool = True  # thinking mode when a request does not say
    # seconds for a request's line and headers to arrive (from the connection, or the end of the
    # previous response); then the connection closes
    header_timeout: float = 30.0
    body_timeout: float = 30.0  # seconds for a request's body to arrive after its headers; then 408
    # Host header names served (port ignored); "*": any. None: the localhost names and the bound
    # address when bound to loopback (no web page reaches it through a rebound DNS name), else any.
    allowed_hosts: tuple[str, ...] | None = None
    # hosts whose http(s) image URLs chat requests may name ("*": any); the server fetches them
    # (redirects only to listed hosts). Empty, the default: images come as data: URLs only, and
    # the server makes no outside calls.
    remote_image_hosts: tuple[str, ...] = ()
    remote_image_timeout: float = 10.0  # seconds to connect to a remote image and per read

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if (
                f.name
                in (
                    "max_body_bytes",
                    "max_tokens",
                    "max_concurrent_requests",
                    "max_sequences_per_request",
                    "max_queued_sequences",
                    "max_queued_tokens",
                    "max_images_per_request",
                )
                and value < 1
            ):
                raise ValueError(f"ServerConfig.{f.name}={value!r} must be >= 1")
            if f.name in ("max_queue",) and value < 0:
                raise ValueError(f"ServerConfig.{f.name}={value!r} must be >= 0")
            timeouts = (
                "request_timeout",
                "keepalive",
                "header_timeout",
                "body_timeout",
                "remote_image_timeout",
            )
            if f.name in timeouts and not value > 0:
                raise ValueError(f"ServerConfig.{f.name}={value!r} must be > 0")
        if self.max_sequences_per_request > self.max_queued_sequences:
            per_request = self.max_sequences_per_request
            raise ValueError(
                f"ServerConfig.max_sequences_per_request={per_request} must not "
                f"exceed max_queued_sequences={self.max_queued_sequences}"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"ServerConfig.port={self.port!r} must lie in [0, 65535]")
        if self.allowed_hosts is not None:
            self.allowed_hosts = tuple(host_name(h) for h in self.allowed_hosts)
            if not self.allowed_hosts or not all(self.allowed_hosts):
                raise ValueError("ServerConfig.allowed_hosts must name hosts, none empty")
        self.remote_image_hosts = tuple(host_name(h) for h in self.remote_image_hosts)
        if not all(self.remote_image_hosts):
            raise ValueError("ServerConfig.remote_image_hosts must name hosts, none empty")
        if self.api_key == "":
            raise ValueError("ServerConfig.api_key must not be empty (leave it unset for no key)")

    def host_names(self) -> frozenset[str] | None:
        """The Host header names this server answers (lowercase, no port); None: any."""
        if self.allowed_hosts is not None:
            return None if "*" in self.allowed_hosts else frozenset(self.allowed_hosts)
        host = host_name(self.host)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        return frozenset((*LOCAL_NAMES, host)) if loopback else None


def host_name(host: str) -> str:
    """A host as Host headers are compared: lowercase, no brackets around
    an IPv6 address, no trailing dot."""
    return host.strip().lower().strip("[]").rstrip(".")
