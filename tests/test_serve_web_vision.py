"""Images in the web chat, in a real browser (headless Debian Chromium through Playwright, as
tests/test_serve_web.py) against a real `nanoseek serve` of a vision-language checkpoint trained
here: an image attached with the file picker, pasted, or dropped onto the composer reaches the
model as an OpenAI image_url data URL and the model's trained answer for THAT picture appears;
history re-sends earlier images; the page's own checks (not an image, a format neither the server
nor the browser reads) say what is wrong before anything is sent; an image over the pixel limit is
scaled down to fit, and the note says so; a corrupt image shows the server's 400; on a text-only
checkpoint the attach control is disabled and says why. Screenshots go to test-artifacts/web/.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from serve_helpers import (
    ARTIFACTS,
    CHROMIUM,
    TINY_VISION,
    VISION_SCRIPT,
    ServerProcess,
    build_random_checkpoint,
    build_vision_checkpoint,
    picture_png,
)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no /usr/bin/chromium: the browser test needs "
    "`apt-get update && apt-get install -y chromium` (and `pip install playwright`)",
)

RED, RED_QUESTION, RED_THOUGHT, RED_ANSWER = VISION_SCRIPT[0]
BLUE, BLUE_QUESTION, BLUE_THOUGHT, BLUE_ANSWER = VISION_SCRIPT[1]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def checkpoints():
    tmp = Path(tempfile.mkdtemp(prefix="nanoseek-web-vision-"))
    try:
        yield build_vision_checkpoint(tmp / "vision"), build_random_checkpoint(tmp / "text")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def vision_server(checkpoints):
    with ServerProcess(checkpoints[0], "--max-images-per-request", "2") as s:
        yield s.wait_ready()


@pytest.fixture(scope="module")
def text_server(checkpoints):
    with ServerProcess(checkpoints[1]) as s:
        yield s.wait_ready()


def open_page(browser, url: str):
    """A fresh browser context on the server's chat page; .bodies collects the chat requests'
    JSON bodies, .errors the page's script errors."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.bodies = []
    page.on(
        "request", lambda r: r.url.endswith(CHAT) and page.bodies.append(json.loads(r.post_data))
    )
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.set_default_timeout(30_000)
    page.goto(url + "/")
    return page


@pytest.fixture
def files(tmp_path):
    """The test's image files: the two trained pictures, and the bad ones."""
    out = {name: tmp_path / f"{name.replace(' ', '-')}.png" for name in (RED, BLUE)}
    for name, path in out.items():
        path.write_bytes(picture_png(name))
    side = 128  # 16,384 pixels: over the checkpoint's limit of 96 x 96
    assert side * side > TINY_VISION["max_image_pixels"]
    out["large"] = tmp_path / "large.png"
    out["large"].write_bytes(picture_png(RED, side))
    out["notes"] = tmp_path / "notes.txt"
    out["notes"].write_text("not a picture")
    out["tiff"] = tmp_path / "scan.tiff"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="TIFF")
    out["tiff"].write_bytes(buf.getvalue())
    out["corrupt"] = tmp_path / "corrupt.png"  # a PNG signature, then nothing a decoder can use
    out["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return out


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def file_in_page(page, path: Path, kind: str = "image/png"):
    """A JS DataTransfer holding the file, as a drop or a paste carries it."""
    return page.evaluate_handle(
        """([b64, name, kind]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: kind }));
            return dt;
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name, kind],
    )


def paste(page, path: Path):
    dt = file_in_page(page, path)
    page.evaluate(
        """(dt) => document.getElementById("input").dispatchEvent(
            new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true }))""",
        dt,
    )


def drop(page, path: Path, kind: str = "image/png", target: str = "#input"):
    dt = file_in_page(page, path, kind)
    page.dispatch_event(target, "dragover", {"dataTransfer": dt})
    assert "dragging" in page.get_attribute("#composer", "class")
    page.dispatch_event(target, "drop", {"dataTransfer": dt})


def ask(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")


def settle(page):
    page.locator("#send:not([hidden])").wait_for()


def greedy(page):
    """Temperature 0, and a short answer for the questions the model was not trained on."""
    page.click("#settings-toggle")
    for field, value in (("temperature", "0"), ("max_tokens", "64")):
        page.fill(f"#{field}", value)
        page.dispatch_event(f"#{field}", "change")
    page.click("#settings-toggle")


def test_attached_images_get_their_trained_answers(browser, vision_server, files):
    page = open_page(browser, vision_server.url)
    greedy(page)
    attach = page.locator("#attach:not([disabled])")
    attach.wait_for()  # the page asked /v1/models: this model reads images
    assert "paste or drop" in attach.get_attribute("title")

    # 1. the file picker: a thumbnail before sending, the image in the conversation, its answer
    page.set_input_files("#attach-input", str(files[RED]))
    page.locator("#attachments img.thumb").wait_for()
    ask(page, RED_QUESTION)
    answer = page.locator(".message.assistant").nth(0)
    answer.locator(".content", has_text=RED_ANSWER).wait_for()
    assert answer.locator(".thinking .reasoning").inner_text() == RED_THOUGHT
    shown = page.locator(".message.user img.thumb")
    assert shown.count() == 1 and shown.get_attribute("src") == data_url(files[RED])
    assert page.locator("#attachments").is_hidden()  # the tray emptied when the message went
    assert page.bodies[-1]["messages"] == [
        {
            "role": "user",
            "content": [image_part(files[RED]), {"type": "text", "text": RED_QUESTION}],
        }
    ]
    settle(page)
    page.screenshot(path=str(ARTIFACTS / "7-image-file.png"))

    # 2. a pasted image, in a new conversation: the other picture gets the other answer
    page.click("#new-chat")
    paste(page, files[BLUE])
    page.locator("#attachments img.thumb").wait_for()
    ask(page, BLUE_QUESTION)
    answer = page.locator(".message.assistant").nth(0)
    answer.locator(".content", has_text=BLUE_ANSWER).wait_for()
    assert answer.locator(".thinking .reasoning").inner_text() == BLUE_THOUGHT
    assert RED_ANSWER not in answer.inner_text()
    settle(page)

    # 3. a dropped image, and a follow-up that re-sends it as history
    page.click("#new-chat")
    drop(page, files[RED], target="#messages")  # anywhere on the page, not only on the box
    page.locator("#attachments img.thumb").wait_for()
    ask(page, RED_QUESTION)
    page.locator(".message.assistant").nth(0).locator(".content", has_text=RED_ANSWER).wait_for()
    settle(page)
    ask(page, "And now?")
    # an untrained follow-up: its answer may be empty (a hidden bubble); only the request matters
    page.locator(".message.assistant").nth(1).wait_for(state="attached")
    settle(page)
    first = page.bodies[-1]["messages"]
    assert first[0] == {
        "role": "user",
        "content": [image_part(files[RED]), {"type": "text", "text": RED_QUESTION}],
    }
    assert first[1]["role"] == "assistant" and RED_ANSWER in first[1]["content"]
    assert first[2] == {"role": "user", "content": "And now?"}
    # two new images fill this server's two per request: the earlier one stays behind, and says so
    page.set_input_files("#attach-input", [str(files[BLUE]), str(files[RED])])
    page.locator("#attachments figure").nth(1).wait_for()
    ask(page, "Which is which?")
    # an untrained follow-up: its answer may be empty (a hidden bubble); only the request matters
    page.locator(".message.assistant").nth(2).wait_for(state="attached")
    settle(page)
    sent = page.bodies[-1]["messages"]
    assert sent[0] == {"role": "user", "content": RED_QUESTION}
    assert sent[-1]["content"][:2] == [image_part(files[BLUE]), image_part(files[RED])]
    page.locator(".message.user .status", has_text="1 earlier image not sent again").wait_for()
    page.screenshot(path=str(ARTIFACTS / "8-image-history.png"))

    # conversations with images survive a reload
    page.reload()
    assert page.locator("#conversations li").count() == 3
    page.locator("#conversations li").nth(1).click()  # newest first: the pasted picture's
    page.locator(".message.assistant .content", has_text=BLUE_ANSWER).wait_for()
    assert page.locator(".message.user img.thumb").get_attribute("src") == data_url(files[BLUE])
    assert page.errors == []


def test_the_page_checks_images_and_shows_the_servers_error(browser, vision_server, files):
    page = open_page(browser, vision_server.url)
    page.locator("#attach:not([disabled])").wait_for()
    note = page.locator("#attach-note")

    page.set_input_files("#attach-input", str(files["notes"]))
    note.get_by_text("notes.txt is not an image").wait_for()
    page.set_input_files("#attach-input", str(files["tiff"]))
    note.get_by_text("image/tiff is not a format this server reads").wait_for()
    drop(page, files["notes"], "text/plain")
    note.get_by_text("notes.txt is not an image").wait_for()
    assert page.locator("#attachments").is_hidden() and page.bodies == []  # nothing went out

    # an attached image can be taken back before sending
    page.set_input_files("#attach-input", [str(files[RED]), str(files[BLUE])])
    page.locator("#attachments figure").nth(1).wait_for()
    assert page.locator("#attachments figure").count() == 2
    assert note.is_hidden()
    page.locator("#attachments figure button").first.click()
    assert page.locator("#attachments figure").count() == 1
    page.locator("#attachments figure button").click()
    assert page.locator("#attachments").is_hidden()

    # the browser cannot judge a corrupt PNG: it goes, and the server's 400 is shown in the chat
    page.set_input_files("#attach-input", str(files["corrupt"]))
    page.locator("#attachments figure").wait_for()
    ask(page, RED_QUESTION)
    error = page.locator(".message.assistant .status.error")
    error.wait_for()
    assert error.inner_text().startswith("400: bad image:"), error.inner_text()
    settle(page)
    page.screenshot(path=str(ARTIFACTS / "9-image-errors.png"))
    # the server is still up, and the failed question is not sent again as history
    page.set_input_files("#attach-input", str(files[BLUE]))
    page.locator("#attachments img.thumb").wait_for()
    greedy(page)
    ask(page, BLUE_QUESTION)
    page.locator(".message.assistant").nth(1).locator(".content", has_text=BLUE_ANSWER).wait_for()
    assert page.bodies[-1]["messages"] == [
        {
            "role": "user",
            "content": [image_part(files[BLUE]), {"type": "text", "text": BLUE_QUESTION}],
        }
    ]
    assert page.errors == []


def test_an_image_over_the_pixel_limit_is_scaled_down_to_fit(browser, vision_server, files):
    """128 x 128 against the checkpoint's 96 x 96: the page redraws it at 96 x 96 (PNG), says so,
    and the server takes it (no error)."""
    page = open_page(browser, vision_server.url)
    page.locator("#attach:not([disabled])").wait_for()
    page.set_input_files("#attach-input", str(files["large"]))
    note = page.locator("#attach-note")
    note.get_by_text("large.png was scaled down from 128×128 to 96×96 (PNG)").wait_for()
    page.locator("#attachments img.thumb").wait_for()
    greedy(page)
    ask(page, RED_QUESTION)
    settle(page)
    # the server took it (the answer for a redrawn picture is not what the model was trained on)
    assert page.locator(".message.assistant .status.error").count() == 0
    url = page.bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (96, 96)
    assert page.errors == []


def test_a_text_only_model_disables_attach(browser, text_server, files):
    page = open_page(browser, text_server.url)
    # an attribute selector, not wait_for_function: the page's CSP forbids evaluating strings
    page.locator("#attach[title*='reads text only']").wait_for(state="attached")
    assert page.locator("#attach").is_disabled()
    drop(page, files[RED])  # a drop is refused with the same words
    page.locator("#attach-note", has_text="reads text only").wait_for()
    assert page.locator("#attachments").is_hidden()
    page.screenshot(path=str(ARTIFACTS / "10-text-only.png"))
    assert page.errors == []


def test_a_full_browser_storage_drops_the_oldest_images_first(browser, text_server, files):
    page = open_page(browser, text_server.url)

    def conversation(key, picture):
        image = {"url": data_url(files[picture]), "name": files[picture].name}
        user = {"role": "user", "content": f"look {key}", "images": [image]}
        return {"id": key, "title": key, "messages": [user, {"role": "assistant", "content": "ok"}]}

    state = {
        "current": "recent",
        "conversations": [conversation("recent", RED), conversation("older", BLUE)],
    }
    stored = json.dumps(state)
    page.evaluate("(s) => localStorage.setItem('nanoseek.chat.v1', s)", stored)
    page.reload()
    # a storage quota that holds the text and one of the two images, not both
    quota = len(stored) - len(data_url(files[BLUE])) // 2
    page.evaluate(
        """(quota) => {
            const setItem = Storage.prototype.setItem;
            Storage.prototype.setItem = function (key, value) {
                if (value.length > quota) throw new DOMException("full", "QuotaExceededError");
                return setItem.call(this, key, value);
            };
        }""",
        quota,
    )
    page.click("#new-chat")  # saves
    kept = json.loads(page.evaluate("localStorage.getItem('nanoseek.chat.v1')"))
    images = {c["id"]: c["messages"][0]["images"][0]["url"] for c in kept["conversations"][1:]}
    assert images == {"recent": data_url(files[RED]), "older": None}
    page.locator("#conversations li", has_text="older").click()
    page.locator(".message.user .thumb.missing", has_text="image not kept").wait_for()
    page.locator("#conversations li", has_text="recent").click()
    assert page.locator(".message.user img.thumb").get_attribute("src") == data_url(files[RED])
    assert page.errors == []
