"""The web chat in a real browser: headless Debian Chromium driven by
Playwright, against a real `nanoseek serve`.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and `pip install playwright` (no `playwright
install`: the system browser is used). Screenshots go to test-artifacts/web/.
"""

import httpx
import pytest

from serve_helpers import (
    ARTIFACTS,
    CHROMIUM,
    SCRIPT,
    ServerProcess,
    metric,
    shared_checkpoint,
)

HELLO, HELLO_THOUGHT, HELLO_ANSWER = SCRIPT[0]
NIHAO, NIHAO_THOUGHT, NIHAO_ANSWER = SCRIPT[1]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no /usr/bin/chromium: the browser test needs "
    "`apt-get update && apt-get install -y chromium` (and `pip install playwright`)",
)


KEY = "sekret"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(shared_checkpoint(), "--api-key", KEY) as s:
        yield s.wait_ready()


@pytest.fixture
def page(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.set_default_timeout(30_000)
    response = page.goto(server.url + "/")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    yield page
    context.close()


def ask(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def settings(page, **values):
    """Open the settings, set fields as a person would (each change is saved), close them again."""
    page.click("#settings-toggle")
    for field, value in values.items():
        page.fill(f"#{field}", value)
        page.dispatch_event(f"#{field}", "change")
    page.click("#settings-toggle")


def test_chat_in_english_and_chinese_with_the_thought_and_a_stop(page, server):
    settings(page, api_key=KEY, temperature="0")

    ask(page, HELLO)
    answer = page.locator(".message.assistant").nth(0)
    answer.locator(".content", has_text=HELLO_ANSWER).wait_for()
    assert answer.locator(".thinking .reasoning").inner_text() == HELLO_THOUGHT
    assert answer.locator(".thinking summary").inner_text().startswith("Thought")
    page.locator("#send:not([hidden])").wait_for()
    page.screenshot(path=str(ARTIFACTS / "1-english.png"))

    ask(page, NIHAO)
    answer = page.locator(".message.assistant").nth(1)
    answer.locator(".content", has_text=NIHAO_ANSWER).wait_for()
    assert answer.locator(".thinking .reasoning").inner_text() == NIHAO_THOUGHT
    answer.locator(".thinking summary").click()  # the thought folds away
    assert not answer.locator(".thinking .reasoning").is_visible()
    page.locator("#send:not([hidden])").wait_for()
    page.screenshot(path=str(ARTIFACTS / "2-chinese.png"))
    assert page.locator("#conversations li").count() == 1

    page.click("#new-chat")
    settings(page, max_tokens="450")
    ask(page, "Sing")  # a song that never ends
    answer = page.locator(".message.assistant").nth(0)
    answer.locator(".content", has_text="la la la").wait_for()
    # at once: on a loaded machine a screenshot first could outlast the trained song
    page.click("#stop")
    answer.locator(".status", has_text="Stopped").wait_for()
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    page.screenshot(path=str(ARTIFACTS / "4-stopped.png"))
    while metric(httpx.get(server.url + "/metrics").text, "nanoseek_engine_sequences_running"):
        page.wait_for_timeout(50)  # the server cancelled it: nothing keeps running
    assert page.locator("#conversations li").count() == 2

    page.reload()  # conversations persist in the browser
    page.locator("#conversations li", has_text=HELLO).click()
    page.locator(".message.assistant .content", has_text=NIHAO_ANSWER).wait_for()
    # nothing from outside
    assert all(url.startswith(server.url) for url in page.requests), page.requests
    assert page.errors == []


def test_markdown_is_rendered_and_html_is_escaped(page):
    html = page.evaluate("""() => markdown([
        "# Title", "Some **bold**, *italic* and `code <b>`.", "", "- one", "- two", "", "1. first", "",
        "```python", "print('<script>')", "```", "> quoted", "[link](https://example.org/?a=1&b=2)",
        "[bad](javascript:alert(1))", "<img src=x onerror=alert(1)>", "中文 **粗体**"].join("\\n"))""")  # noqa: E501 (JavaScript source, kept as written)
    assert (
        "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>italic</em>" in html
    )
    assert "<code>code &lt;b&gt;</code>" in html and "<ul><li>one</li><li>two</li></ul>" in html
    assert "<ol><li>first</li></ol>" in html and "<blockquote>quoted</blockquote>" in html
    assert '<pre><code class="language-python">print(&#39;&lt;script&gt;&#39;)</code></pre>' in html
    assert (
        '<a href="https://example.org/?a=1&amp;b=2" '
        'target="_blank" rel="noopener noreferrer">link</a>' in html
    )
    assert 'href="javascript' not in html and "[bad](javascript:alert(1))" in html
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<strong>粗体</strong>" in html
    page.locator("#input").fill("<b>not bold</b>")  # the user's own text is shown as text
    page.press("#input", "Enter")
    assert page.locator(".message.user .content").first.inner_text() == "<b>not bold</b>"
    page.locator("#send:not([hidden])").wait_for()

    # A stored conversation whose answer is Markdown: rendered, with its thought folded.
    page.evaluate("""() => localStorage.setItem("nanoseek.chat.v1", JSON.stringify({current: "md", conversations: [
        {id: "md", title: "Markdown", messages: [{role: "user", content: "Show me code"},
         {role: "assistant", reasoning: "The user wants code.", thinkingOpen: false, content:
          "## Adding numbers\\nUse **`sum`**:\\n\\n```python\\nprint(sum([1, 2, 3]))\\n```\\n- fast\\n- 简单"}]}]}))""")  # noqa: E501 (JavaScript source, kept as written)
    page.reload()
    answer = page.locator(".message.assistant .content")
    assert answer.locator("h2").inner_text() == "Adding numbers"
    assert answer.locator("pre code.language-python").inner_text() == "print(sum([1, 2, 3]))"
    assert answer.locator("li").all_inner_texts() == ["fast", "简单"]
    assert not page.locator(".thinking .reasoning").is_visible()
    page.screenshot(path=str(ARTIFACTS / "6-markdown.png"))


def test_a_missing_api_key_is_explained_and_the_setting_fixes_it(page):
    ask(page, HELLO)
    page.locator(".message.assistant .status.error", has_text="401").wait_for()
    assert (
        "set the API key in Settings"
        in page.locator(".message.assistant .status.error").inner_text()
    )
    page.screenshot(path=str(ARTIFACTS / "5-no-api-key.png"))
    settings(page, api_key=KEY, temperature="0")
    ask(page, HELLO)
    # The retry asks the question afresh (the failed exchange is not sent as history), so the answer
    # is the one the test model learned for it.
    page.locator(".message.assistant").nth(1).locator(".content", has_text=HELLO_ANSWER).wait_for()
    assert page.locator(".message.assistant .status.error").count() == 1  # the first try only
