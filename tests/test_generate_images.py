"""`nanoseek generate CKPT PROMPT --image PATH`, run as a user runs it (a real subprocess) on a tiny
vision-language checkpoint built here: the streamed text equals an in-process Engine's on the same
prompt ids and picture (the same code path on the same machine), and two pictures that the reference
answers differently are answered differently through the command too (the image reaches the model);
placeholders pair with the images in order; every bad image, and an image given to a text-only
checkpoint, is one error line naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from nanoseek.checkpoint import load_checkpoint
from nanoseek.data.images import expand_image_tokens, image_input
from nanoseek.engine import Engine, SamplingParams

import helpers
from helpers import save_tiny

# a small pixel limit, so that an over-limit picture is cheap to make
VISION = {**helpers.TINY_VISION, "max_image_pixels": 64 * 64}
PROMPT = "What colour is it?"
MAX_TOKENS = 5
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 255), (0, 0, 0), (250, 220, 0)]


def generate(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanoseek.cli", "generate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return helpers.save_untrained_vision(tmp_path_factory.mktemp("vlm"), vision=VISION)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, colour in enumerate(COLOURS):
        paths.append(root / f"plain-{i}.png")
        Image.new("RGB", (40, 24), colour).save(paths[-1])
    return paths


def reference(
    checkpoint, prompt_text: str, images: list[Image.Image], generate: bool = True
) -> tuple[list[int], str | None]:
    """(prompt ids, streamed text) of an in-process Engine, the ids built here independently of
    the command: the tokenizer's own `<image>` special token, then data.images' expansion."""
    ckpt = load_checkpoint(checkpoint, vision=True)
    tok = ckpt.tokenizer
    vcfg = ckpt.model.vision.config
    inputs = image_input(images, vcfg)
    ids = tok.encode(prompt_text, add_bos=True, allow_special=True)
    ids, _ = expand_image_tokens(ids, inputs.grids, ckpt.model.image_token_id, vcfg)
    if not generate:
        return ids, None
    engine = Engine(ckpt.model, tok, max_batch_size=1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    text = "".join(ev.text for ev in engine.stream(ids, params, images=inputs))
    return ids, text


def test_the_image_reaches_the_model_and_the_stream_matches_the_engine(checkpoint, pictures):
    """Without a placeholder the image goes in front of the text (as the chat template puts an
    image part before its text). Of the plain pictures, two that the in-process reference answers
    differently are answered as the reference answers each through the command."""
    answers = {}
    for path in pictures:
        _, text = reference(checkpoint, "<image>" + PROMPT, [Image.open(path).convert("RGB")])
        answers.setdefault(text, path)
        if len(answers) == 2:
            break
    assert len(answers) == 2, "no two pictures changed the greedy answer: the image is ignored"
    for text, path in answers.items():
        out = generate(
            checkpoint, PROMPT, "--image", path, "--temperature", 0, "--max-tokens", MAX_TOKENS
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == PROMPT + text + "\n"
        assert f"[{MAX_TOKENS} tokens in" in out.stderr


def test_placeholders_take_the_images_in_order(checkpoint, tmp_path):
    """Two images of different shapes (so that their expansions differ in length) fill the
    prompt's two `<image>` in the order given: the command's prompt ids and pictures are the
    reference's for either order, a prompt without placeholders gets them in front; and the
    command's stream with both equals the reference engine's."""
    from nanoseek.cli.infer import image_prompt

    wide = tmp_path / "wide.png"
    square = tmp_path / "square.png"
    Image.new("RGB", (64, 32), (255, 0, 0)).save(wide)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(square)
    images = {p: Image.open(p).convert("RGB") for p in (wide, square)}
    ckpt = load_checkpoint(checkpoint, vision=True)
    prompt = "first <image> then <image>" + PROMPT
    seen = []
    for order in ((wide, square), (square, wide)):
        pics = [images[p] for p in order]
        ids, inputs = image_prompt(ckpt.model, ckpt.tokenizer, prompt, pics)
        want_ids, _ = reference(checkpoint, prompt, pics, generate=False)
        want = image_input(pics, ckpt.model.vision.config)
        assert ids == want_ids and inputs.grids == want.grids
        assert torch.equal(inputs.pixel_values, want.pixel_values)
        front, _ = image_prompt(ckpt.model, ckpt.tokenizer, PROMPT, pics)
        assert front == reference(checkpoint, "<image><image>" + PROMPT, pics, generate=False)[0]
        seen.append(ids)
    assert seen[0] != seen[1]  # the grids differ: the order shows in the ids
    _, text = reference(checkpoint, prompt, [images[wide], images[square]])
    out = generate(
        checkpoint, prompt, "--image", wide, "--image", square, "--temperature", 0,
        "--max-tokens", MAX_TOKENS, "--ignore-eos",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == prompt + text + "\n"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = root / "good.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(good)
    data = good.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.png").write_text("this is not an image\n")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(root / "picture.tiff")
    Image.new("RGB", (100, 100), (0, 0, 255)).save(root / "large.png")  # over 64 x 64 pixels
    return root


@pytest.mark.parametrize(
    "name, message",
    [
        ("truncated.png", "--image {path}: truncated PNG data"),
        ("notes.png", "--image {path}: not a recognisable image; supported formats: PNG, JPEG"),
        ("picture.tiff", "--image {path}: unsupported image format TIFF; supported: PNG"),
        ("large.png", "--image {path}: image is 100x100 = 10000 pixels, over the limit of 4096"),
        ("missing.png", "no image file at {path}"),
    ],
)
def test_a_bad_image_is_one_error_line_naming_the_file(checkpoint, bad_files, name, message):
    path = bad_files / name
    out = generate(checkpoint, PROMPT, "--image", bad_files / "good.png", "--image", path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("nanoseek generate: error: " + message.format(path=path))
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_text_only_checkpoint_and_a_miscounted_prompt_are_refused(checkpoint, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    text_only = save_tiny(tmp_path / "lm")
    out = generate(text_only, PROMPT, "--image", image)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"nanoseek generate: error: --image: {text_only}: this model does not read images (its "
        "checkpoint has no vision tower)"
    )
    out = generate(checkpoint, "<image> and <image>" + PROMPT, "--image", image)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "nanoseek generate: error: the prompt has 2 <image> placeholder(s) for 1 --image file(s)"
    )
