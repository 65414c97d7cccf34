"""The server under abuse: slow clients (header and body timeouts, streams that are never read), the
Host and Content-Type rules against web pages that would drive a local server, 401's
WWW-Authenticate, the OpenAPI schema, and schema fuzzing against it (no 5xx, every error an OpenAI
error object). Real HTTP on 127.0.0.1 throughout; short timeouts so it runs in seconds."""

import json
import socket
import threading
import time

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings

from nanoseek.checkpoint import load_checkpoint
from nanoseek.serve.app import create_app
from nanoseek.serve.config import ServerConfig
from nanoseek.serve.http import uvicorn_config

import serve_fuzz
from serve_helpers import InProcessServer, ServerProcess, build_random_checkpoint, metric

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("hardening") / "model")


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(
        checkpoint,
        "--api-key",
        KEY,
        "--max-tokens",
        "4",
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
    ) as s:
        yield s.wait_ready()


def connect(server, data: bytes = b"") -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes | None:
    """All the server sends until it closes the connection; None if still open after `timeout`."""
    sock.settimeout(timeout)
    data = b""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:  # dropped with unread data
        return data
    return None


def error_of(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    return json.loads(body)["error"]


# ----------------------------------------------------------------------------- slow clients


def test_connections_that_stall_before_their_headers_are_closed(server):
    silent = [connect(server) for _ in range(5)]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-"
    partial = [connect(server, head) for _ in range(5)]
    start = time.monotonic()
    for sock in silent:
        assert read_until_closed(sock, 5) == b""
    for sock in partial:
        raw = read_until_closed(sock, 5)
        assert raw is not None, "a stalled connection is still open"
        assert error_of(raw, 408)["code"] == "header_timeout"
    assert time.monotonic() - start < 4  # the timeout is 1 s
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_body_that_arrives_too_slowly_gets_408(server):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    )
    stalled = connect(server, head + b'{"messages": ')
    trickle = connect(server, head)
    start = time.monotonic()
    for _ in range(4):  # a byte every 0.2 s keeps the connection busy, not the body on time
        trickle.sendall(b" ")
        time.sleep(0.2)
    for sock in (stalled, trickle):
        raw = read_until_closed(sock, 5)
        assert raw is not None, "a slow body's connection is still open"
        assert error_of(raw, 408)["code"] == "body_timeout"
    assert time.monotonic() - start < 5


def test_a_body_nobody_reads_still_has_a_deadline(server):
    """Refused before its body is read (no key), the request's connection still closes once the body
    is late, however steadily the client trickles it."""
    sock = connect(
        server,
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        b"application/json\r\nContent-Length: 1000\r\n\r\n{",
    )
    start = time.monotonic()
    closed = False
    while time.monotonic() - start < 6 and not closed:
        try:
            sock.sendall(b" ")
        except OSError:
            closed = True
        time.sleep(0.2)
    assert closed or read_until_closed(sock, 1) is not None
    assert time.monotonic() - start < 5


def test_unread_streams_are_dropped_at_the_request_timeout(checkpoint):
    """Clients that never read a stream: once the server's buffers fill, its send blocks; at the
    request timeout the connection is dropped and the slot and engine requests are freed. Small
    socket buffers (on both ends) make the buffers fill within the timeout."""
    import uvicorn

    config = ServerConfig(request_timeout=2, max_tokens=450)
    app = create_app(config, lambda: load_checkpoint(checkpoint), {"max_batch_size": 64})
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.1)
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
                "n": 8,
                "max_tokens": 450,
                "ignore_eos": True,
                "logprobs": True,
                "top_logprobs": 20,
            }
        ).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        ) + body
        clients = []
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            clients.append(sock)
        start = time.monotonic()
        time.sleep(0.5)
        assert metric(httpx.get(url + "/metrics").text, "nanoseek_requests_running") == 4
        while True:
            text = httpx.get(url + "/metrics").text
            running = metric(text, "nanoseek_requests_running")
            sequences = metric(text, "nanoseek_engine_sequences_running")
            if running == 0 and sequences == 0:
                break
            assert time.monotonic() - start < 5, f"{running:g} unread streams still hold slots"
            time.sleep(0.1)
        for sock in clients:  # and each connection was closed
            assert read_until_closed(sock, 10) is not None
    finally:
        server.should_exit = True
        thread.join(30)


# ----------------------------------------------------------------------------- web pages


def test_the_default_hosts_follow_the_bound_address():
    assert ServerConfig().host_names() == {"localhost", "127.0.0.1", "::1"}
    assert "127.0.0.2" in ServerConfig(host="127.0.0.2").host_names()
    assert ServerConfig(host="[::1]").host_names() == {"localhost", "127.0.0.1", "::1"}
    for public in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert ServerConfig(host=public).host_names() is None  # reachable by names it cannot know
    named = ServerConfig(host="0.0.0.0", allowed_hosts=("[::1]", " A.example. "))
    assert named.host_names() == {"::1", "a.example"}
    assert ServerConfig(allowed_hosts=("a.example", "*")).host_names() is None
    for bad in (
        dict(allowed_hosts=()),
        dict(allowed_hosts=(" ",)),
        dict(header_timeout=0),
        dict(body_timeout=-1),
    ):
        with pytest.raises(ValueError):
            ServerConfig(**bad)


def test_a_foreign_host_header_is_refused(server):
    port = server.url.rsplit(":", 1)[1]
    for path in ("/", "/health", "/v1/models", "/openapi.json"):
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            r = httpx.get(server.url + path, headers={**AUTH, "Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.post(
        server.url + "/v1/chat/completions", json=CHAT, headers={**AUTH, "Host": "rebound.example"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "Host"
    for host in (
        f"localhost:{port}",
        "LOCALHOST",
        f"127.0.0.1:{port}",
        f"[::1]:{port}",
        "localhost.",
    ):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_replace_the_default(checkpoint):
    cases = [
        (ServerConfig(allowed_hosts=("API.example.",)), {"api.example:443": 200, "localhost": 400}),
        (ServerConfig(allowed_hosts=("*",)), {"evil.example": 200, "localhost": 200}),
        (ServerConfig(host="0.0.0.0"), {"evil.example": 200, "10.1.2.3:80": 200}),
        (ServerConfig(host="::1"), {"[::1]": 200, "evil.example": 400}),
    ]
    for config, expected in cases:
        app = create_app(config, lambda: load_checkpoint(checkpoint))
        with InProcessServer(app) as s:
            for host, status in expected.items():
                r = httpx.get(s.url + "/openapi.json", headers={"Host": host})
                assert r.status_code == status, (config.allowed_hosts, config.host, host)


def test_post_bodies_must_be_json(server):
    raw = json.dumps(CHAT).encode()
    for media in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/jsonx",
        None,
    ):
        headers = {**AUTH, **({"Content-Type": media} if media else {})}
        r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers)
        assert r.status_code == 415, media
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    for media in (
        "application/json",
        "Application/JSON; charset=UTF-8",
        'application/json;charset="utf-8"',
    ):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            content=raw,
            headers={**AUTH, "Content-Type": media},
        )
        assert r.status_code == 200, (media, r.text)


def test_401_names_the_bearer_scheme(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models").headers["www-authenticate"] == "Bearer"


# ----------------------------------------------------------------------------- the schema


@pytest.fixture(scope="module")
def openapi(server):
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_openapi_describes_the_real_request_bodies(openapi, server):
    chat = serve_fuzz.request_schema(openapi, "/v1/chat/completions")
    completion = serve_fuzz.request_schema(openapi, "/v1/completions")
    valid = [
        (chat, CHAT),
        (
            chat,
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "text", "text": "x"}],
                        "prefix": True,
                    }
                ],
                "thinking": {"type": "disabled"},
                "response_format": {"type": "json_object"},
                "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": {"5": -100},
            },
        ),
        (completion, {"prompt": "x"}),
        (completion, {"prompt": [[1, 2], [3]], "echo": True}),
        (completion, {"prompt": ["a", "b"], "n": 2, "stop": ["\n"], "seed": 3}),
    ]
    invalid = [
        (chat, {}),
        (chat, {"messages": []}),
        (chat, {"messages": [{"role": "robot"}]}),
        (chat, {**CHAT, "n": 0}),
        (chat, {**CHAT, "temperature": 3}),
        (completion, {}),
        (completion, {"prompt": 5}),
        (completion, {"prompt": "x", "top_p": 0}),
    ]
    for schema, body in valid:
        jsonschema.validate(body, schema)
        route = "/v1/chat/completions" if schema is chat else "/v1/completions"
        assert httpx.post(server.url + route, json=body, headers=AUTH).status_code == 200, body
    for schema, body in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema)
        route = "/v1/chat/completions" if schema is chat else "/v1/completions"
        assert httpx.post(server.url + route, json=body, headers=AUTH).status_code == 400, body
    responses = openapi["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "415", "429"} <= set(responses)
    assert openapi["paths"]["/v1/models"]["get"]["responses"]["200"]


def test_schema_fuzzing_finds_no_server_error(openapi, server):
    """Bodies drawn from the served schema (valid, wrong values in the schema's fields, any JSON):
    no 5xx, every error an OpenAI error object."""
    client = httpx.Client(timeout=60)
    found = []
    statuses = []

    @settings(
        max_examples=150,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(serve_fuzz.requests(openapi))
    def fuzz(request):
        route, body = request
        status, problems = serve_fuzz.send(client, server.url, route, body, AUTH)
        statuses.append(status)
        found.extend(problems)

    start = time.monotonic()
    fuzz()
    assert not found, found[:5]
    assert len(statuses) == 150 and 200 in statuses and 400 in statuses
    assert time.monotonic() - start < 60
