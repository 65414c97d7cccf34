"""Shared pieces of the serving tests: a tiny checkpoint that really answers (a tokenizer trained
here on a few KB of text, a tiny model trained here to say a few scripted things), and a real
`nanoseek serve` subprocess."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from nanoseek import Transformer, save_model
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tokenizer import Tokenizer

from helpers import TINY_VISION as TEST_VISION_TOWER
from helpers import smallest_margin, tiny_config

SRC = Path(__file__).resolve().parents[1] / "src"
# The browser tests (test_serve_web*.py): Debian's Chromium through Playwright, screenshots here.
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# (user message, thought, answer): what the test model learns to say.
# "Sing" never ends (no EOS is learned).
SCRIPT = [
    ("Hello", "The user greets me.", "Hello! How can I help you today?"),
    ("你好", "用户在打招呼。", "你好！有什么可以帮你的吗？"),
    ("Sing", "A long song.", "la " * 150),
]
CORPUS = """The quick brown fox jumps over the lazy dog. A small model answers questions about numbers, words
and code. Hello! How can I help you today? The user greets me and I greet the user back. Thinking first, then
answering, is how this model works. {"name": "nanoseek", "layers": [1, 2, 3], "ok": true, "none": null}
def add(a, b):
    return a + b
你好，世界！今天天气很好。我们去公园散步吧。用户在打招呼。你好！有什么可以帮你的吗？这是一个很小的模型。
Numbers like 12, 345 and 6789 are split into digits. la la la la la. A long song goes on and on.
"""  # noqa: E501 (a test vector: its exact bytes are trained into the checkpoints)


def build_tokenizer(vocab_size: int = 400) -> Tokenizer:
    return Tokenizer.train([CORPUS] * 8, vocab_size=vocab_size)


def build_checkpoint(path: Path, steps: int = 100, context: int = 512, margin: float = 2.0) -> Path:
    """Train the tokenizer and a 2-layer MoE model that has memorised SCRIPT, alone and as two turns
    (greedy decoding replays it), save both. A few seconds on one CPU thread.

    The tests assert what greedy decoding says, so every learned next token must win by at least
    `margin` nats over the runner-up: far beyond the rounding of any CPU's kernels. Training goes
    on, in rounds of `steps`, until it does; it fails loudly rather than hand over a model whose
    replay is a coin toss."""
    tok = build_tokenizer()
    inputs, targets = _memorised_sequences(tok)
    model = train_to_margin(tok, inputs, targets, steps, context, margin)
    save_model(model.eval(), path, tokenizer=tok)
    return path


def train_to_margin(
    tok: Tokenizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 100,
    context: int = 512,
    margin: float = 2.0,
) -> Transformer:
    """A 2-layer MoE model trained on (inputs, targets) until every learned token wins by
    `margin` nats (see build_checkpoint)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead (and the machine is shared)
    try:
        torch.manual_seed(0)
        model = Transformer(
            tiny_config(
                vocab_size=tok.vocab_size, max_position_embeddings=context, num_hidden_layers=2
            )
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(MAX_TRAINING_ROUNDS):
            model.train()
            for _ in range(steps):
                loss = model.compute_loss(inputs, targets).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            weakest = smallest_margin(model.eval(), inputs, targets)
            if weakest >= margin:
                break
        else:
            raise RuntimeError(
                f"the test model did not memorise its script: a learned token wins by only "
                f"{weakest:.3f} nats after {MAX_TRAINING_ROUNDS * steps} steps"
            )
    finally:
        torch.set_num_threads(threads)
    return model


MAX_TRAINING_ROUNDS = 5


def _memorised_sequences(tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [N, T]: each SCRIPT exchange, and two turns where
    only the second answer is learned.

    A token is learned only where its context has one answer: what the assistant says, from the
    token after "<｜Assistant｜>" on. The user's words are not (three different ones follow the
    same "<｜User｜>"), nor is the first answer of the two-turn conversation: clients send earlier
    answers back without their thoughts, and were it learned, "<think>" and "Hello!" would both
    follow "<｜User｜>Hello<｜Assistant｜>", so which one a prompt without a prefilled "<think>"
    gets would be decided by float rounding."""
    rows = []  # (ids, position of the last prompt token, learn the final EOS)
    (first_user, _, first_answer) = SCRIPT[0]
    history = [
        {"role": "user", "content": first_user},
        {"role": "assistant", "content": first_answer},
    ]
    exchanges = [([], exchange) for exchange in SCRIPT] + [(history, SCRIPT[1])]
    for earlier, (user, thought, answer) in exchanges:
        prompt = [*earlier, {"role": "user", "content": user}]
        context = tok.apply_chat_template(prompt, add_generation_prompt=True, thinking=False)
        reply = {"role": "assistant", "content": answer, "reasoning_content": thought}
        ids = tok.apply_chat_template([*prompt, reply])
        assert ids[: len(context)] == context
        rows.append((ids, len(context) - 1, not answer.startswith("la ")))  # "Sing" never ends
    return memorised_tensors(rows, tok.eos_id)


def memorised_tensors(
    rows: list[tuple[list[int], int, bool]], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [N, T] of rows (ids, position of the last prompt token, learn the final
    token): what follows the prompt is learned."""
    T = max(len(ids) for ids, _, _ in rows)
    inputs = torch.full((len(rows), T), pad)
    targets = torch.full((len(rows), T), IGNORE_INDEX)
    for i, (ids, last_prompt, learn_eos) in enumerate(rows):
        inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, last_prompt : len(ids) - 1] = torch.tensor(ids[last_prompt + 1 :])
        if not learn_eos:
            targets[i, len(ids) - 2] = IGNORE_INDEX
    return inputs, targets


# (image, question, thought, answer): what the vision test model learns. Each picture is a shape
# drawn on white (PICTURES): only the image tells the two questions apart.
VISION_SCRIPT = [
    ("red circle", "What is this?", "A round shape.", "A red circle."),
    ("blue square", "What is this?", "A shape with corners.", "A blue square."),
]
# A small vision tower, and a pixel limit low enough that a "too large" image is cheap to make.
TINY_VISION = {**TEST_VISION_TOWER, "max_image_pixels": 96 * 96}


def picture(name: str, size: int = 32):
    """One of VISION_SCRIPT's pictures: "red circle" or "blue square", on white, as a PIL image."""
    from PIL import Image, ImageDraw

    colour, shape = name.split()
    img = Image.new("RGB", (size, size), "white")
    box = (size // 8, size // 8, size - size // 8, size - size // 8)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return img


def picture_png(name: str, size: int = 32) -> bytes:
    import io

    buf = io.BytesIO()
    picture(name, size).save(buf, format="PNG")
    return buf.getvalue()


def build_vision_checkpoint(
    path: Path, steps: int = 100, context: int = 256, margin: float = 2.0
) -> Path:
    """A vision-language checkpoint (build_tokenizer's tokenizer, a 2-layer MoE language model, a
    one-block vision tower) trained whole until, for each VISION_SCRIPT picture, the chat prompt
    a client sends (the image part, then the question) is answered with that picture's thought
    and answer, every learned token winning by `margin` nats (see build_checkpoint). Seconds on
    one CPU thread."""
    import functools

    from nanoseek.checkpoint import save_vision_language_model
    from nanoseek.config import VisionConfig
    from nanoseek.data.images import expand_image_tokens, image_input, merge_inputs
    from nanoseek.model.vision import VisionLanguageModel

    tok = build_tokenizer()
    vcfg = VisionConfig(**TINY_VISION)
    image_id = tok.special_ids["image"]
    rows = []
    inputs_per_row = []
    for name, question, thought, answer in VISION_SCRIPT:
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        reply = {"role": "assistant", "content": answer, "reasoning_content": thought}
        images = image_input([picture(name)], vcfg)
        prompt = tok.apply_chat_template([user], add_generation_prompt=True, thinking=False)
        prompt, _ = expand_image_tokens(prompt, images.grids, image_id, vcfg)
        ids, _ = expand_image_tokens(
            tok.apply_chat_template([user, reply]), images.grids, image_id, vcfg
        )
        assert ids[: len(prompt)] == prompt
        rows.append((ids, len(prompt) - 1, True))
        inputs_per_row.append(images)
    inputs, targets = memorised_tensors(rows, tok.eos_id)
    images = merge_inputs(inputs_per_row)  # row order is placeholder order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = tiny_config(
            vocab_size=tok.vocab_size,
            max_position_embeddings=context,
            num_hidden_layers=2,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
        )
        vlm = VisionLanguageModel.build(cfg, vcfg, image_id)
        opt = torch.optim.AdamW(vlm.parameters(), lr=1e-2)
        for _ in range(MAX_TRAINING_ROUNDS):
            vlm.train()
            for _ in range(steps):
                loss = vlm.compute_loss(inputs, targets, images=images).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            weakest = smallest_margin(functools.partial(vlm.eval(), images=images), inputs, targets)
            if weakest >= margin:
                break
        else:
            raise RuntimeError(
                f"the vision test model did not learn its pictures: a learned token wins by only "
                f"{weakest:.3f} nats after {MAX_TRAINING_ROUNDS * steps} steps"
            )
    finally:
        torch.set_num_threads(threads)
    return save_vision_language_model(vlm.eval(), path, tokenizer=tok)


_SHARED: dict[str, Path] = {}


def shared_checkpoint() -> Path:
    """build_checkpoint() once per test process, for every module that serves it."""
    if "path" not in _SHARED:
        tmp = Path(tempfile.mkdtemp(prefix="nanoseek-serve-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _SHARED["path"] = build_checkpoint(tmp / "model", steps=200)
    return _SHARED["path"]


def build_random_checkpoint(path: Path, context: int = 512) -> Path:
    """Random weights, the same trained tokenizer."""
    tok = build_tokenizer()
    torch.manual_seed(1)
    save_model(
        Transformer(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=context)).eval(),
        path,
        tokenizer=tok,
    )
    return path


def nanoseek(*args, stdin="", timeout=300) -> subprocess.CompletedProcess:
    """`nanoseek ARGS`, run as `python -m nanoseek.cli ARGS` with this checkout's sources."""
    env = dict(
        os.environ,
        PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "nanoseek.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=timeout,
    )


class ServerProcess:
    """`nanoseek serve CKPT --port 0 ...` as a subprocess; .url once /health says ok."""

    def __init__(self, checkpoint: Path, *args: str, log_path: Path | None = None):
        env = dict(
            os.environ,
            PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        self.cmd = [
            sys.executable,
            "-m",
            "nanoseek.cli",
            "serve",
            str(checkpoint),
            "--port",
            "0",
            "--threads",
            "1",
            *args,
        ]
        self.proc = subprocess.Popen(
            self.cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
        )
        self.lines: list[str] = []
        self.url: str | None = None
        found = threading.Event()

        def read():  # keep draining the pipe so the server never blocks on a full one
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"nanoseek serve: (http://\S+)", line)
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + self.log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready:\n" + self.log)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class InProcessServer:
    """The app under uvicorn on a thread of this process, on a free port: for tests that reach into
    the server (hold the engine still, break it) while talking real HTTP to it."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.server

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text ("name" may include labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)
