"""The terminal chat behind `nanoseek chat`: multi-turn, streaming, with a
local checkpoint or a running server.

    nanoseek chat runs/cpu/model               # loads the model and runs the engine in-process
    nanoseek chat --url http://127.0.0.1:8000  # talks to `nanoseek serve` (or any OpenAI-
                                               # compatible server)

Commands: /reset forgets the conversation, /thinking on|off, /image PATH attaches an image to the
next message (a vision-language checkpoint, or a server that serves one), /exit (or Ctrl-D) leaves;
Ctrl-C stops an answer. The thought is shown dimmed on a terminal (between <think> tags otherwise)
and is not sent back in later turns.
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanoseek.checkpoint import Checkpoint

HELP = (
    "commands: /reset (new conversation), /thinking on|off, /image PATH (attach to the next "
    "message), /exit (or Ctrl-D); Ctrl-C stops an answer"
)


class Stop:
    """Ctrl-C while an answer streams sets a flag instead of raising, so the answer ends cleanly."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def armed(self):
        self.requested = False
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "requested", True))
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class LocalBackend:
    """The engine in this process."""

    def __init__(self, ckpt: Checkpoint, engine_options: dict | None = None):
        """engine_options: Engine keyword arguments (the decode path, say)."""
        from nanoseek.engine import Engine
        from nanoseek.serve.chat_format import EngineTokenizer

        self.tok = ckpt.tokenizer
        self.defaults = ckpt.defaults
        tok = EngineTokenizer(ckpt.tokenizer)
        self.engine = Engine(ckpt.model, tok, max_batch_size=1, **(engine_options or {}))

    def image_part(self, path: str) -> dict:
        """An image file -> its content part, checked here (ValueError: a text-only model, or a
        file that is not a usable image)."""
        from nanoseek.serve.images import TEXT_ONLY

        if self.engine.vision is None:
            raise ValueError(TEXT_ONLY)
        return image_part(path, self.engine.vision.config.max_image_pixels)

    def reply(self, messages: list[dict], opts: dict) -> Iterator[tuple[str, str]]:
        from nanoseek.engine import SamplingParams
        from nanoseek.serve.chat_format import ReasoningParser, chat_request_prompt
        from nanoseek.serve.images import load_request_images

        turns, urls = _template_turns(messages)
        images = None
        vcfg = None
        if urls:
            vcfg = self.engine.vision.config
            images = load_request_images(urls, vcfg)
        ids, in_reasoning, _ = chat_request_prompt(
            self.tok, turns, opts["thinking"], images=images, vision_config=vcfg
        )
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the conversation ({len(ids)} tokens) fills "
                "the model's context; /reset to start over"
            )
        params = SamplingParams(
            max_tokens=min(opts["max_tokens"] or room, room),
            seed=opts["seed"],
            temperature=_pick(opts["temperature"], self.defaults.get("temperature"), 1.0),
            top_p=_pick(opts["top_p"], self.defaults.get("top_p"), 1.0),
        )
        parser = ReasoningParser(in_reasoning)
        events = self.engine.stream(ids, params, images=images)
        try:
            for ev in events:
                yield parser.feed(ev.text or "")
            yield parser.finish()
        finally:
            events.close()  # cancels the request if the answer was stopped


class RemoteBackend:
    """A server's /v1/chat/completions, streamed (SSE)."""

    def __init__(self, url: str, api_key: str | None, model: str | None):
        self.base = url.rstrip("/").removesuffix("/v1")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model = model or self._get("/v1/models")["data"][0]["id"]

    def image_part(self, path: str) -> dict:
        """An image file -> its content part (whether the model reads images, the server says)."""
        return image_part(path)

    def _get(self, path: str) -> dict:
        req = urllib.request.Request(self.base + path, headers=self.headers)
        with _http(req) as resp:
            return json.load(resp)

    def reply(self, messages: list[dict], opts: dict) -> Iterator[tuple[str, str]]:
        body = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "thinking": {"type": "enabled" if opts["thinking"] else "disabled"},
        }
        for key in ("max_tokens", "temperature", "top_p", "seed"):
            if opts[key] is not None:
                body[key] = opts[key]
        req = urllib.request.Request(
            self.base + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers=self.headers,
            method="POST",
        )
        # leaving early closes the connection: the server cancels the generation
        with _http(req) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank lines and ": keep-alive" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                for choice in chunk["choices"]:
                    delta = choice["delta"]
                    yield delta.get("reasoning_content") or "", delta.get("content") or ""


@contextmanager
def _http(req):
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            yield resp
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise RuntimeError(f"{e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"cannot reach {req.full_url}: {e.reason}") from None


def image_part(path: str, max_pixels: int | None = None) -> dict:
    """An image file -> an OpenAI image content part (a base64 data URL), checked with load_image
    (ValueError naming the problem)."""
    import base64
    import io

    from PIL import Image

    from nanoseek.data.images import ImageError, load_image

    try:
        load_image(path, **({"max_pixels": max_pixels} if max_pixels else {}))
        data = open(path, "rb").read()
    except (ImageError, OSError) as e:
        raise ValueError(f"{path}: {e}") from None
    fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    url = f"data:image/{fmt};base64," + base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def _template_turns(messages: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Messages with OpenAI image parts -> (the chat template's messages, with {"type": "image"}
    parts, and (field, URL) of each image in order)."""
    turns = []
    urls = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part["type"] == "image_url":
                    urls.append((f"messages.{i}.content.{j}.image_url", part["image_url"]["url"]))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            m = {**m, "content": parts}
        turns.append(m)
    return turns, urls


def _pick(*values):
    return next(v for v in values if v is not None)


class Printer:
    """Writes reasoning dimmed (or inside <think> tags when not on a terminal), then the answer."""

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.mode = None

    def write(self, reasoning: str, content: str) -> None:
        if reasoning:
            if self.mode is None:
                self.out.write("\x1b[2m" if self.tty else "<think>\n")
                self.mode = "reasoning"
            self.out.write(reasoning)
        if content:
            if self.mode == "reasoning":
                self.out.write("\x1b[0m\n\n" if self.tty else "\n</think>\n")
            self.mode = "content"
            self.out.write(content)
        self.out.flush()

    def end(self) -> None:
        if self.mode == "reasoning":
            self.out.write("\x1b[0m" if self.tty else "\n</think>")
        self.out.write("\n")
        self.out.flush()
        self.mode = None


def repl(backend, opts: dict, system: str | None = None, out=sys.stdout) -> None:
    system_turn = [{"role": "system", "content": system}] if system else []
    messages = list(system_turn)
    stop = Stop()
    printer = Printer(out)
    pending: list[dict] = []  # /image parts for the next user message
    print(HELP, file=out)
    while True:
        try:
            line = input("\nyou> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=out)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(system_turn)
            pending = []
            print("(new conversation)", file=out)
            continue
        if text.startswith("/thinking"):
            opts["thinking"] = text.split()[-1] != "off"
            print(f"(thinking {'on' if opts['thinking'] else 'off'})", file=out)
            continue
        if text.startswith("/image"):
            path = text[len("/image") :].strip()
            if not path:
                print("usage: /image PATH (the next message carries that image)", file=out)
                continue
            try:
                pending.append(backend.image_part(path))
            except ValueError as e:
                print(f"error: {e}", file=out)
                continue
            print(f"(image {path} goes with your next message)", file=out)
            continue
        if text.startswith("/"):
            print(HELP, file=out)
            continue
        if pending:
            content = [*pending, {"type": "text", "text": text}]
            pending = []
        else:
            content = text
        messages.append({"role": "user", "content": content})
        answer = []
        out.write("assistant> ")
        try:
            with stop.armed():
                for reasoning, content in backend.reply(messages, opts):
                    printer.write(reasoning, content)
                    answer.append(content)
                    if stop.requested:
                        break
        except (RuntimeError, ValueError) as e:
            printer.end()
            print(f"error: {e}", file=out)
            messages.pop()
            continue
        printer.end()
        if stop.requested:
            print("(stopped)", file=out)
        messages.append({"role": "assistant", "content": "".join(answer)})
