"""The HTTP layer under the routes: what a connection and a request must do before the API sees
them, and what a client that stops reading or writing costs.

- `TimedH11Protocol` (uvicorn's h11 protocol, which has no header timeout): a request's line and
  headers must arrive within `header_timeout` of the connection (or of the previous response), its
  body within `body_timeout` of its headers (plus a second's grace for the app's own 408), else the
  connection closes; a response still unsent at `request_timeout` after its request closes the
  connection as soon as the client stops reading, so that an unread stream gives back its slot and
  its engine requests.
- `Guard` (ASGI middleware): the Host header must name this server (`ServerConfig.host_names`), a
  POST body must be `application/json`, and the body must arrive within `body_timeout` (408).

    uvicorn.Server(uvicorn_config(app, config, log_level="info")).run()
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanoseek.serve.config import ServerConfig, host_name
from nanoseek.serve.errors import APIError

log = logging.getLogger("nanoseek.serve")
BODY_GRACE = 1.0  # seconds the protocol waits past body_timeout for the app's own 408
LINGER = 5.0  # seconds a closed connection may take to hand over what it has buffered; then dropped


def uvicorn_config(app, config: ServerConfig, **kwargs) -> uvicorn.Config:
    """A uvicorn.Config for `app` whose connections keep `config`'s timeouts."""
    protocol = type(
        "Protocol",
        (TimedH11Protocol,),
        {
            "header_timeout": config.header_timeout,
            "body_timeout": config.body_timeout,
            "request_timeout": config.request_timeout,
        },
    )
    return uvicorn.Config(app, http=protocol, **kwargs)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header, body and unread-response
    deadlines (class attributes, seconds)."""

    header_timeout = 30.0
    body_timeout = 30.0
    request_timeout = 600.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._phase: str | None = None  # awaited from the client: "headers", "body" or None
        self._read_timer: asyncio.TimerHandle | None = None
        self._response_timer: asyncio.TimerHandle | None = None
        self._timed_cycle = None  # the request whose response timer runs
        self._overdue = False  # the response outlived request_timeout: close once writes stall

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc) -> None:
        self._cancel_read_timer()
        self._cancel_response_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        self._cancel_response_timer()
        super().on_response_complete()  # may start the next pipelined request
        self._watch()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._overdue:
            self._abort()

    # ------------------------------------------------------------------ deadlines
    def _watch(self) -> None:
        """Arm the deadline of what the connection waits for from the client now."""
        if self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle is not self._timed_cycle and not cycle.response_complete:
            self._timed_cycle = cycle  # a request has arrived: its response is due by the deadline
            self._cancel_response_timer()
            self._response_timer = self.loop.call_later(self.request_timeout, self._response_late)
        phase = {h11.IDLE: "headers", h11.SEND_BODY: "body"}.get(self.conn.their_state)
        if phase == self._phase:
            return
        self._cancel_read_timer()
        self._phase = phase
        if phase == "headers":
            self._read_timer = self.loop.call_later(self.header_timeout, self._read_late)
        elif phase == "body":
            self._read_timer = self.loop.call_later(self.body_timeout + BODY_GRACE, self._read_late)

    def _read_late(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._phase == "headers" and not self.conn.trailing_data[0]:  # an idle connection
            self.transport.close()
            return
        if self._phase == "headers":  # part of a request came
            self.transport.write(_REQUEST_TIMEOUT)
        self._close(f"its request's {self._phase} did not arrive in time")

    def _response_late(self) -> None:
        self._response_timer = None
        self._overdue = True
        if self.flow.write_paused:
            self._abort()

    def _close(self, why: str) -> None:
        log.info("closing the connection from %s: %s", _address(self.client), why)
        self.transport.close()
        self.loop.call_later(LINGER, self.transport.abort)  # a no-op once closed

    def _abort(self) -> None:
        """Drop the connection now: close() would wait for the unread response to drain."""
        log.info(
            "dropping the connection from %s: its response outlived the request timeout and "
            "the client stopped reading",
            _address(self.client),
        )
        self.transport.abort()

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _cancel_response_timer(self) -> None:
        if self._response_timer is not None:
            self._response_timer.cancel()
            self._response_timer = None
        self._overdue = False


def _address(client: tuple[str, int] | None) -> str:
    return "?" if client is None else f"{client[0]}:{client[1]}"


def _raw_response(error: APIError) -> bytes:
    """A whole HTTP/1.1 response for an error, for where no request was parsed to answer."""
    body = json.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {error.status} Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


_REQUEST_TIMEOUT = _raw_response(
    APIError(408, "the request's headers did not arrive in time", code="header_timeout")
)


class Guard:
    """ASGI middleware: the Host header must name this server, a POST body must be JSON, and the
    body must arrive within `body_timeout` seconds of the headers. A refusal is an OpenAI error
    (400, 415 or 408); `on_error(type)` counts it."""

    def __init__(self, app, config: ServerConfig, on_error: Callable[[str], None]):
        self.app = app
        self.hosts = config.host_names()
        self.body_timeout = config.body_timeout
        self.on_error = on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # the last of a repeated header (latin-1 bytes)
        refusal = self.refusal(scope["method"], headers)
        if refusal is not None:
            return await self.refuse(refusal, send, scope["path"])
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        body_done = False

        async def receive_in_time():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise APIError(
                    408,
                    f"the request body did not arrive within {self.body_timeout:g} s",
                    code="body_timeout",
                    headers={"Connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, receive_in_time, send)

    def refusal(self, method: str, headers: dict[bytes, bytes]) -> APIError | None:
        if self.hosts is not None and b"host" in headers:  # browsers always send one
            host = headers[b"host"].decode("latin-1")
            if _host_of(host) not in self.hosts:
                return APIError(
                    400,
                    f"the Host header {host[:100]!r} does not name this server "
                    f"(see --allowed-hosts)",
                    param="Host",
                    code="host_not_allowed",
                )
        if method == "POST":
            media = headers.get(b"content-type", b"").decode("latin-1")
            if not _is_json(media):
                return APIError(
                    415,
                    f"the request body must be JSON, sent with 'Content-Type: "
                    f"application/json'; got {media[:100]!r}",
                    param="Content-Type",
                    code="unsupported_media_type",
                )
        return None

    async def refuse(self, error: APIError, send, path: str = "") -> None:
        self.on_error(error.type)
        body = json.dumps(error.body_for(path)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _host_of(header: str) -> str:
    """The host of a Host header, without its port."""
    header = header.strip()
    if header.startswith("["):  # [v6]:port
        return host_name(header.partition("]")[0])
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return host_name(header)


def _is_json(content_type: str) -> bool:
    """Whether a Content-Type is application/json, in UTF-8 if it names a charset."""
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    if media != "application/json":
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True
