"""`nanoseek <command>`: one entry point for every stage. Each command's --help says what it does.

Each command family registers its commands from a module of its own: pipeline.py, posttrain.py,
infer.py, serve.py, export.py. Library code never imports this package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoseek.cli import export, infer, pipeline, posttrain, serve
from nanoseek.hostmem import tune_host_memory

# the commands whose work is decoding with the engine: a step streams the weights (hostmem)
DECODING_COMMANDS = ("serve", "chat", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek", description="A small, hackable DeepSeek-style LLM system."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipeline.add_commands(sub)  # demo, data, tokenizer, pretrain, speedrun, report, info
    posttrain.add_commands(sub)  # sft, grpo, distill, eval
    infer.add_commands(sub)  # generate, chat
    serve.add_commands(sub)  # serve
    export.add_commands(sub)  # export
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # freed pages kept; for the commands that decode, large tensors on huge pages (hostmem.py)
    tune_host_memory(huge_pages=args.command in DECODING_COMMANDS)
    if getattr(args, "preset", None) and args.out is None:
        args.out = f"runs/{Path(args.preset).stem}"
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # ConfigError, CheckpointError too
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
