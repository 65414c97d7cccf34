"""Inference commands: `nanoseek generate CKPT PROMPT` streams one completion to the terminal, then
the speed; `nanoseek chat CKPT | --url URL` is the terminal chat of nanoseek/terminal_chat.py.

`generate --image PATH` (repeatable) gives a vision-language checkpoint images: the k-th image fills
the prompt's k-th `<image>`, or, in a prompt without one, the images go in front of the text (one
`<image>` each, as the chat template puts an image part before its text). Each file is checked by
data.images.load_image, the loader the server and the terminal chat use (format, byte and pixel
limits, truncated or corrupt data), before the weights load; a bad one is one error line naming it
(exit code 2)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from nanoseek.checkpoint import load_checkpoint
from nanoseek.cli.common import (
    add_decode_arguments,
    add_weight_arguments,
    check_checkpoint,
    decode_options,
)
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.terminal_chat import LocalBackend, RemoteBackend, repl

IMAGE = "<image>"


def add_generate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face DeepseekV3 layout)")
    p.add_argument("prompt", help="the text to continue (or comma-separated token ids with --ids)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--ids", action="store_true", help="the prompt is token ids; print ids instead of text"
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="draft with the MTP module (if the model has one)",
    )
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image file for a vision-language checkpoint (repeatable, in order): each fills "
        "one <image> of the prompt, or, when the prompt has none, goes in front of it",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_weight_arguments(p)
    add_decode_arguments(p)
    return p


def generate_cli(args: argparse.Namespace) -> int:
    pictures = load_image_files(args.checkpoint, args.image) if args.image else []
    ckpt = load_checkpoint(
        args.checkpoint, args.dtype, args.int8, device=args.device, vision=bool(pictures)
    )
    model = ckpt.model
    tok = None if args.ids else ckpt.tokenizer
    if tok is None and not args.ids:
        print(
            f"error: no tokenizer in {args.checkpoint}; pass token ids with --ids", file=sys.stderr
        )
        return 2
    prompt = [int(t) for t in args.prompt.split(",")] if args.ids else args.prompt
    images = None
    if pictures:
        prompt, images = image_prompt(model, ckpt.tokenizer, prompt, pictures)
    speculative = args.speculative and len(getattr(model, "language_model", model).mtp) > 0
    if args.speculative and not speculative:
        print("note: this model has no MTP module; decoding without speculation", file=sys.stderr)
    engine = Engine(model, tok, max_batch_size=1, speculative=speculative, **decode_options(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    if not args.ids:
        print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    first = None  # when the first token came
    count = 0
    reason = None
    try:
        for ev in engine.stream(prompt, params, images=images):
            first = first or time.perf_counter()
            count += len(ev.token_ids)
            if args.ids:
                more = "," if ev.token_ids and not ev.finished else ""
                print(",".join(map(str, ev.token_ids)) + more, end="", flush=True)
            else:
                print(ev.text, end="", flush=True)
            reason = ev.finish_reason
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    end = time.perf_counter()
    print()
    decode = ""
    if first and count > 1 and end > first:
        decode = f"{(count - 1) / (end - first):.1f} tok/s decode"
    stats = engine.stats()
    extra = ""
    if speculative and stats["spec_drafted"]:
        extra = f", MTP acceptance {stats['spec_acceptance_rate']:.0%}"
    print(
        f"[{count} tokens in {end - start:.2f}s: {count / (end - start):.1f} tok/s overall, "
        f"{decode}; finish: {reason}{extra}]",
        file=sys.stderr,
    )
    return 0


def load_image_files(checkpoint: str, paths: list[str]) -> list:
    """--image files -> RGB images, checked against the checkpoint's pixel limit before its
    weights load. ValueError (one line): a text-only checkpoint, or a file that is not a usable
    image (named)."""
    from nanoseek.config import ModelConfig, VisionConfig
    from nanoseek.data.images import ImageError, load_image
    from nanoseek.serve.images import TEXT_ONLY

    vcfg = VisionConfig.of(ModelConfig.from_pretrained(checkpoint))
    if vcfg is None:
        raise ValueError(f"--image: {checkpoint}: {TEXT_ONLY}")
    images = []
    for path in paths:
        try:
            images.append(load_image(path, max_pixels=vcfg.max_image_pixels))
        except (ImageError, OSError) as e:
            message = str(e)
            raise ValueError(message if path in message else f"--image {path}: {message}") from None
    return images


def image_prompt(model, tok, prompt: str | list[int], images: list):
    """A text (or token-id) prompt and its images -> (token ids with each `<image>` expanded to
    its image's positions, the images' ImageInput). `<image>` in the text is the placeholder
    token; the rest is encoded as plain text. A prompt without placeholders gets one per image
    in front (after the BOS token); any other count is a ValueError."""
    from nanoseek.data.images import expand_image_tokens, image_input

    image_id = model.image_token_id
    if isinstance(prompt, str):
        pieces = prompt.split(IMAGE)
        if len(pieces) == 1:
            pieces = [""] * len(images) + pieces
        ids = [tok.bos_id] if tok.bos_id is not None else []
        for i, piece in enumerate(pieces):
            ids += ([image_id] if i else []) + tok.encode(piece)
    else:
        ids = list(prompt)
        if image_id not in ids:
            at = 1 if ids and tok is not None and ids[0] == tok.bos_id else 0
            ids[at:at] = [image_id] * len(images)
    slots = ids.count(image_id)
    if slots != len(images):
        raise ValueError(
            f"the prompt has {slots} {IMAGE} placeholder(s) for {len(images)} --image file(s)"
        )
    vcfg = model.vision.config
    inputs = image_input(images, vcfg)
    ids, _ = expand_image_tokens(ids, inputs.grids, image_id, vcfg)
    return ids, inputs


def add_chat_arguments(p) -> None:
    p.add_argument(
        "checkpoint", nargs="?", help="a checkpoint directory to load here (or use --url)"
    )
    p.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--api-key", default=os.environ.get("NANOSEEK_API_KEY"), help="(default: $NANOSEEK_API_KEY)"
    )
    p.add_argument(
        "--model", default=None, help="model name to ask the server for (default: its first model)"
    )
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--no-thinking", action="store_true", help="answer without a thought")
    p.add_argument("--temperature", type=float, default=None, help="(default: the checkpoint's)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument(
        "--max-tokens", type=int, default=None, help="(default: what the context leaves)"
    )
    p.add_argument("--seed", type=int, default=None)
    add_weight_arguments(p)
    add_decode_arguments(p)


def cmd_chat(args) -> int:
    if (args.checkpoint is None) == (args.url is None):
        raise ValueError("give a checkpoint directory or --url of a server (one of the two)")
    if args.url:
        backend = RemoteBackend(args.url, args.api_key, args.model)
    else:
        backend = LocalBackend(
            load_checkpoint(check_checkpoint(args.checkpoint), args.dtype, args.int8, vision=True),
            decode_options(args),
        )
    opts = dict(
        thinking=not args.no_thinking,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    repl(backend, opts, args.system)
    return 0


def add_commands(sub) -> None:
    """Register `nanoseek generate` and `nanoseek chat`."""
    p = sub.add_parser("generate", help="stream one completion of PROMPT, then tokens/s")
    add_generate_arguments(p)
    p.set_defaults(func=generate_cli)
    p = sub.add_parser(
        "chat",
        help="chat in the terminal with a checkpoint or a running server",
        description="Multi-turn chat in the terminal, streaming. /reset forgets the "
        "conversation, /image PATH attaches an image to the next message (a vision-language "
        "checkpoint), /exit leaves; Ctrl-C stops an answer.",
    )
    add_chat_arguments(p)
    p.set_defaults(func=cmd_chat)
