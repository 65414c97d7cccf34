"""`nanoseek export CKPT --gguf OUT.gguf [--type f32|bf16|q8_0]`: a checkpoint as a llama.cpp file;
add_commands(subparsers) registers it."""

from __future__ import annotations

from pathlib import Path

from nanoseek.export.gguf import TYPES


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint as a GGUF file for llama.cpp (and ollama, LM Studio)",
        description="Write a checkpoint as one llama.cpp GGUF file (architecture deepseek2): the "
        "MLA and MoE metadata, the weights without the MTP modules, and the "
        "tokenizer. Refuses checkpoints llama.cpp would run differently; see "
        "docs/gguf.md.",
    )
    p.add_argument(
        "checkpoint", help="a checkpoint directory (config.json, weights, tokenizer.json)"
    )
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument(
        "--type",
        choices=TYPES,
        default="f32",
        help="how the matrices are stored (default: f32; norms and router stay f32)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from nanoseek.export import export_gguf

    path = export_gguf(args.checkpoint, args.gguf, type=args.type)
    print(f"wrote {path} ({Path(path).stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0
