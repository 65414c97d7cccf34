"""Images through the API: a real `nanoseek serve` on a tiny vision-language checkpoint built here.

The official `openai` client sends an image as a data URL (streaming and not); the server's greedy
tokens equal an in-process Engine on the same prompt ids (the same code path on the same machine);
the prefix cache serves a repeated image and not another image behind the same text; the chat
template renders an image part as one `<image>` in the Python renderer and the Jinja template
alike; every bad image is a 400 naming its field, and the server stays up."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from nanoseek.checkpoint import (
    load_checkpoint,
    load_vision_language_model,
)
from nanoseek.data.images import MAX_IMAGE_BYTES, image_input, image_prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model.vision import VisionLanguageModel
from nanoseek.serve.chat_format import EngineTokenizer, TokenTable, chat_request_prompt

import helpers
from serve_helpers import ServerProcess, build_random_checkpoint, nanoseek

# a small pixel limit, so that a "decompression bomb" is cheap to make
TINY_VISION = {**helpers.TINY_VISION, "max_image_pixels": 64 * 64}
QUESTION = "\nWhat colour is it?"
MAX_TOKENS = 6


def _png(size=(32, 32), colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _messages(url: str, text: str = QUESTION) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory):
    return helpers.save_untrained_vision(tmp_path_factory.mktemp("vlm"), vision=TINY_VISION)


@pytest.fixture(scope="module")
def server(vlm_checkpoint):
    with ServerProcess(vlm_checkpoint, "--max-images-per-request", "2") as s:
        yield s.wait_ready()


def _reference(path, image: bytes) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy ids) from an in-process Engine on the same checkpoint."""
    vlm = load_vision_language_model(path).eval()
    tok = load_checkpoint(path).tokenizer
    vcfg = vlm.vision.config
    images = image_input([Image.open(io.BytesIO(image)).convert("RGB")], vcfg)
    ids, _, _ = chat_request_prompt(tok, _messages_for_template(), True, [], "none", images, vcfg)
    engine = Engine(vlm, EngineTokenizer(tok))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = engine.generate([ids], params, images=[images])[0]
    return ids, out.token_ids


def _messages_for_template() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def test_an_image_part_renders_as_one_placeholder_in_both_renderers(vlm_checkpoint):
    tok = load_checkpoint(vlm_checkpoint).tokenizer
    vcfg = load_vision_language_model(vlm_checkpoint).vision.config
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    images = image_input([img], vcfg)
    ids, _, _ = chat_request_prompt(tok, _messages_for_template(), True, [], "none", images, vcfg)
    # the training path's one-turn prompt, "<image>" written where the image goes
    expected, _ = image_prompt_ids(tok, "<image>" + QUESTION, [img], vcfg)
    assert ids == expected
    # "<image>" typed by a user stays text
    typed = [{"role": "user", "content": "<image>" + QUESTION}]
    plain = tok.apply_chat_template(typed, add_generation_prompt=True, sanitize=True)
    assert tok.special_ids["image"] not in plain
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(vlm_checkpoint)
    text = tok.apply_chat_template(
        _messages_for_template(), add_generation_prompt=True, tokenize=False
    )
    assert text.count("<image>") == 1
    assert (
        hf.apply_chat_template(_messages_for_template(), add_generation_prompt=True, tokenize=False)
        == text
    )


def test_openai_client_sends_an_image_and_the_server_matches_the_engine(server, vlm_checkpoint):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    red = _png()
    ids, greedy = _reference(vlm_checkpoint, red)
    tok = load_checkpoint(vlm_checkpoint).tokenizer
    table = TokenTable(tok)
    counted = httpx.post(server.url + "/tokenize", json={"messages": _messages(_data_url(red))})
    assert counted.status_code == 200, counted.text
    assert counted.json()["tokens"] == ids
    kwargs = dict(
        model="nanoseek",
        messages=_messages(_data_url(red)),
        temperature=0,
        max_tokens=MAX_TOKENS,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    resp = client.chat.completions.create(**kwargs)
    assert resp.usage.prompt_tokens == len(ids)
    assert [t.token for t in resp.choices[0].logprobs.content] == [table.text(i) for i in greedy]
    # the same image again: served from the prefix cache, and the same tokens streamed
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = [
        t.token
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert streamed == [table.text(i) for i in greedy]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    # another image behind the same text: no block of the prompt is shared
    kwargs["messages"] = _messages(_data_url(_png(colour=(0, 0, 255))))
    other = client.chat.completions.create(**kwargs)
    assert other.usage.prompt_tokens == len(ids)
    assert other.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize(
    "case",
    ["corrupt", "truncated", "bomb", "unsupported", "remote", "not_data", "bad_base64", "too_many"],
)
def test_bad_images_are_400s_naming_the_field(server, case):
    png = _png((48, 48))
    param = "messages.0.content.0.image_url"
    if case == "corrupt":
        urls = [_data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)]
    elif case == "truncated":
        noisy = Image.frombytes("RGB", (48, 48), bytes(range(256)) * 27)
        buf = io.BytesIO()
        noisy.save(buf, format="PNG")
        urls = [_data_url(buf.getvalue()[: len(buf.getvalue()) // 2])]
    elif case == "bomb":
        urls = [_data_url(_png((128, 128)))]  # over the checkpoint's 64 x 64 pixel limit
    elif case == "unsupported":
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format="TIFF")
        urls = [_data_url(buf.getvalue(), "image/tiff")]
    elif case == "remote":
        urls = ["https://example.com/cat.png"]
    elif case == "not_data":
        urls = ["file:///etc/passwd"]
    elif case == "bad_base64":
        urls = ["data:image/png;base64,@@@not base64@@@"]
    else:
        urls = [_data_url(png)] * 3
        param = "messages.0.content.2.image_url"
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    body = {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}]}
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    words = {
        "corrupt": "image",
        "truncated": "image",
        "bomb": "pixels",
        "unsupported": "TIFF",
        "remote": "remote images are refused",
        "not_data": "data: URL",
        "bad_base64": "base64",
        "too_many": "at most 2",
    }
    assert words[case] in error["message"]
    ok = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": _messages(_data_url(_png())), "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text


def test_models_says_the_model_reads_images_and_the_limits(server):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["input_modalities"] == ["text", "image"]
    assert card["image_limits"] == {
        "max_images_per_request": 2,  # the server's flag
        "max_image_pixels": TINY_VISION["max_image_pixels"],  # the checkpoint's vision_config
        "max_image_bytes": MAX_IMAGE_BYTES,
        "max_body_bytes": 1 << 20,
        "formats": ["image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"],
    }


def test_a_text_only_checkpoint_refuses_images(tmp_path):
    path = build_random_checkpoint(tmp_path / "text")
    with ServerProcess(path) as s:
        s.wait_ready()
        card = httpx.get(s.url + "/v1/models").json()["data"][0]
        assert card["input_modalities"] == ["text"] and card["image_limits"] is None
        r = httpx.post(
            s.url + "/v1/chat/completions",
            json={"messages": _messages(_data_url(_png())), "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "messages.0.content.0.image_url"
        assert "does not read images" in r.json()["error"]["message"]
        text = httpx.post(
            s.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60,
        )
        assert text.status_code == 200


def test_chat_cli_attaches_an_image(vlm_checkpoint, tmp_path):
    red = tmp_path / "red.png"
    red.write_bytes(_png())
    broken = tmp_path / "broken.png"
    broken.write_bytes(_png()[:40])
    stdin = (
        f"/image {tmp_path / 'missing.png'}\n/image {broken}\n/image {red}\nWhat colour?\n/exit\n"
    )
    r = nanoseek(
        "chat", str(vlm_checkpoint), "--temperature", "0", "--max-tokens", "3", stdin=stdin
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"error: {tmp_path / 'missing.png'}: no image file" in out
    assert f"error: {broken}:" in out
    assert f"(image {red} goes with your next message)" in out
    # the image reached the engine: a prompt with <image> positions and no image would be an error
    assert out.count("error:") == 2
    assert "assistant> " in out


def test_chat_cli_with_a_text_only_model_refuses_an_image(tmp_path):
    path = build_random_checkpoint(tmp_path / "text")
    red = tmp_path / "red.png"
    red.write_bytes(_png())
    r = nanoseek("chat", str(path), stdin=f"/image {red}\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "error: this model does not read images" in r.stdout


def test_anthropic_image_blocks_take_the_same_path(server):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    data = base64.b64encode(_png(colour=(0, 255, 0))).decode()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    kwargs = dict(
        model="nanoseek",
        max_tokens=MAX_TOKENS,
        extra_body={"temperature": 0},  # the SDK has no temperature argument any more
        thinking={"type": "disabled"},
        messages=[{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}],
    )
    first = client.messages.create(**kwargs)
    openai_body = {
        "messages": _messages(_data_url(base64.b64decode(data))),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "thinking": {"type": "disabled"},
    }
    chat = httpx.post(server.url + "/v1/chat/completions", json=openai_body, timeout=60).json()
    assert first.usage.input_tokens == chat["usage"]["prompt_tokens"]
    text = "".join(b.text for b in first.content if b.type == "text")
    assert text == (chat["choices"][0]["message"]["content"] or "")
    again = client.messages.create(**kwargs)
    assert again.usage.cache_read_input_tokens > 0
    # a corrupt image, a remote one: 400s naming the block (Anthropic errors name it in the text)
    kwargs["messages"][0]["content"][0]["source"]["data"] = base64.b64encode(b"junk").decode()
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(**kwargs)
    assert "messages.0.content.0.source" in str(bad.value)
    kwargs["messages"][0]["content"][0]["source"] = {"type": "url", "url": "https://x.test/a.png"}
    with pytest.raises(anthropic.BadRequestError) as remote:
        client.messages.create(**kwargs)
    assert "remote images are refused" in str(remote.value)


def test_load_checkpoint_loads_the_tower_only_when_asked(vlm_checkpoint):
    assert isinstance(load_checkpoint(vlm_checkpoint, vision=True).model, VisionLanguageModel)
    text_only = load_checkpoint(vlm_checkpoint).model  # export and the other text commands
    assert not isinstance(text_only, VisionLanguageModel)
    assert not any(name.startswith("vision") for name, _ in text_only.named_parameters())


def test_an_image_outside_a_user_message_is_a_400(server):
    part = {"type": "image_url", "image_url": {"url": _data_url(_png())}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [part]},
        {"role": "user", "content": "and?"},
    ]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages.1.content.0.image_url"
    assert "user messages" in r.json()["error"]["message"]


# ---------------------------------------------------------------------- remote image URLs
class _ImageHost:
    """A local HTTP server (127.0.0.1, a thread of this process) that the server under test fetches
    images from: /red.png, /missing (404), /slow (answers after the fetch timeout), /huge (declares
    a body over the byte limit), /to/PATH (a redirect to PATH on `redirect_host`, same port)."""

    def __init__(self, png: bytes, redirect_host: str):
        import http.server
        import threading
        import time

        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/red.png":
                    self._send(200, png, "image/png")
                elif self.path == "/slow":
                    time.sleep(3)
                    self._send(200, png, "image/png")
                elif self.path == "/huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(MAX_IMAGE_BYTES + 1))
                    self.end_headers()
                elif self.path.startswith("/to/"):
                    self.send_response(302)
                    port = host.port
                    self.send_header("Location", f"http://{redirect_host}:{port}/{self.path[4:]}")
                    self.end_headers()
                else:
                    self._send(404, b"no such image", "text/plain")

            def _send(self, code, body, kind):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # /slow: the fetch gave up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_remote_images_come_only_from_the_hosts_the_operator_allows(vlm_checkpoint):
    """`--remote-image-hosts 127.0.0.1`: an image URL on that host reads as its data URL does (the
    same prompt, whose image the prefix cache recognises); another host, a redirect to another
    host, a missing image, a slow one (past --remote-image-timeout) and one over the byte limit
    are 400s naming the field; the Anthropic URL source takes the same path. The default server
    refuses them all (above)."""
    png = _png()
    host = _ImageHost(png, redirect_host="localhost")
    args = ("--remote-image-hosts", "127.0.0.1", "--remote-image-timeout", "1")
    try:
        with ServerProcess(vlm_checkpoint, *args) as s:
            s.wait_ready()

            def chat(url: str) -> httpx.Response:
                body = {"messages": _messages(url), "max_tokens": MAX_TOKENS, "temperature": 0}
                return httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)

            by_data = chat(_data_url(png))
            by_url = chat(host.url("/red.png"))
            assert by_data.status_code == by_url.status_code == 200, by_url.text
            usage = by_url.json()["usage"]
            assert usage["prompt_tokens"] == by_data.json()["usage"]["prompt_tokens"]
            # the prefix cache serves it: the same image (keyed by its pixels' hash) behind the
            # same text. (Greedy tokens are not compared: a cached prefill rounds differently.)
            assert usage["prompt_tokens_details"]["cached_tokens"] > 0
            cases = {
                host.url("/red.png", "localhost"): "refused from host localhost",
                host.url("/to/red.png"): "redirects to localhost",
                host.url("/missing"): "HTTP 404",
                host.url("/slow"): "could not fetch",
                host.url("/huge"): "byte limit",
                "ftp://127.0.0.1/red.png": "data: URL",
                "http://[::1/red.png": "not a valid http(s) URL",
            }
            for url, words in cases.items():
                r = chat(url)
                assert r.status_code == 400, (url, r.text)
                assert r.json()["error"]["param"] == "messages.0.content.0.image_url"
                assert words in r.json()["error"]["message"], (url, r.text)
            anthropic = pytest.importorskip("anthropic")
            client = anthropic.Anthropic(base_url=s.url, api_key="none", max_retries=0)
            source = {"type": "url", "url": host.url("/red.png")}
            content = [{"type": "image", "source": source}, {"type": "text", "text": QUESTION}]
            reply = client.messages.create(
                model="nanoseek",
                max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": content}],
                extra_body={"temperature": 0},
                thinking={"type": "disabled"},
            )
            assert reply.usage.cache_read_input_tokens > 0  # the chat requests' image
    finally:
        host.close()


def test_remote_image_hosts_are_checked_and_normalised():
    from nanoseek.serve.config import ServerConfig
    from nanoseek.serve.images import RemoteImages

    assert ServerConfig(remote_image_hosts=("Example.COM.",)).remote_image_hosts == ("example.com",)
    with pytest.raises(ValueError, match="remote_image_hosts"):
        ServerConfig(remote_image_hosts=("",))
    with pytest.raises(ValueError, match="remote_image_timeout"):
        ServerConfig(remote_image_timeout=0)
    listed = RemoteImages(("example.com",))
    assert listed.allows("https://example.com/a.png")
    assert listed.allows("http://EXAMPLE.com:8080/a.png")
    assert not listed.allows("https://example.com.evil.test/a.png")
    assert not listed.allows("https://evil.test/?example.com")
    assert not listed.allows("ftp://example.com/a.png")
    assert not RemoteImages().allows("https://example.com/a.png")
    assert not listed.allows("http://[::1/a.png")  # not a URL: refused, not an error
    assert "not a valid http(s) URL" in listed.refusal("http://[::1/a.png")
    assert RemoteImages(("*",)).allows("http://10.0.0.1/a.png")
